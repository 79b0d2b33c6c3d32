//! How client commands print: tables for people (colour only when stdout is a terminal and
//! `NO_COLOR` is unset), JSON for scripts (`--output json`), secrets once with a warning, and
//! progress on stderr (only when stderr is a terminal).

use std::io::IsTerminal;

use clap::ValueEnum;
use serde::Serialize;

/// `--output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables and sentences.
    #[default]
    Table,
    /// The API's JSON, one document on stdout.
    Json,
}

/// Where and how to print.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub format: Format,
    color: bool,
    progress: bool,
}

impl Out {
    pub fn new(format: Format) -> Out {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
            || std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Out {
            format,
            color: std::io::stdout().is_terminal() && !no_color,
            progress: std::io::stderr().is_terminal(),
        }
    }

    pub fn json(&self) -> bool {
        self.format == Format::Json
    }

    /// Prints a value as pretty JSON.
    pub fn print_json<T: Serialize + ?Sized>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode the answer as JSON: {e}"),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    pub fn dim(&self, text: &str) -> String {
        self.paint("2", text)
    }

    /// A status word coloured by what it means: green for live, yellow for paused or
    /// deprecated, red for revoked or invalid.
    pub fn status(&self, text: &str) -> String {
        let code = match text {
            "active" | "valid" | "VALID" | "success" => "32",
            "paused" | "deprecated" | "expired" | "denied" => "33",
            "revoked" | "invalid" | "failure" => "31",
            _ => return text.to_string(),
        };
        self.paint(code, text)
    }

    /// Prints a table: a bold header row and left-aligned columns.
    pub fn table(&self, headers: &[&str], rows: &[Vec<String>]) {
        let cols = headers.len();
        let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                width[i] = width[i].max(visible_len(cell));
            }
        }
        let line = |cells: Vec<String>| {
            let mut s = String::new();
            for (i, cell) in cells.iter().enumerate() {
                s.push_str(cell);
                if i + 1 < cells.len() {
                    let pad = width[i].saturating_sub(visible_len(cell)) + 2;
                    s.push_str(&" ".repeat(pad));
                }
            }
            s.trim_end().to_string()
        };
        println!(
            "{}",
            line(
                headers
                    .iter()
                    .map(|h| self.bold(&h.to_ascii_uppercase()))
                    .collect()
            )
        );
        for row in rows {
            println!("{}", line(row.clone()));
        }
    }

    /// Prints `field  value` lines, for one record.
    pub fn fields(&self, rows: &[(&str, String)]) {
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            println!("{}  {v}", self.bold(&format!("{k:<width$}")));
        }
    }

    /// Prints a secret that the server shows only once, with a warning that says so.
    pub fn secret(&self, label: &str, value: &str) {
        println!(
            "\n{} ({}):\n\n    {value}\n",
            self.bold(label),
            self.paint("33", "shown once: store it now, it cannot be shown again")
        );
    }

    /// Progress of a long listing, on stderr and only on a terminal.
    pub fn progress(&self, what: &str, count: u64) {
        if self.progress {
            eprint!("\r\x1b[2Kfetched {count} {what}…");
        }
    }

    /// Clears the progress line.
    pub fn progress_done(&self) {
        if self.progress {
            eprint!("\r\x1b[2K");
        }
    }
}

/// The length of a cell as seen on screen (ANSI colour codes take no room).
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// A one-line chart of `values`, eight levels high, scaled to the largest.
pub fn sparkline(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| {
            if max == 0 {
                BARS[0]
            } else {
                // Rounded up, so that any use shows above an empty hour.
                let level = ((v * 7).div_ceil(max)) as usize;
                BARS[level.min(7)]
            }
        })
        .collect()
}

/// An optional value for a table cell: the value, or `-`.
pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// A timestamp for people: `2026-11-23 10:15:00Z`.
pub fn when(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// An optional timestamp for a table cell.
pub fn when_opt(t: &Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.as_ref().map(when).unwrap_or_else(|| "-".into())
}

/// Prints a listing: with `all`, every page (counting them on stderr) as one list; otherwise the
/// one page the server gave, with a hint on stderr when there are more. `noun` names the list in
/// JSON (`{"agents": [...], "has_more": false}`) and in the progress line.
pub async fn print_listing<T: Serialize, P: Serialize>(
    out: &Out,
    noun: &str,
    all: Option<keyward_client::Pages<'_, T>>,
    one_page: impl std::future::Future<Output = keyward_client::Result<(P, Vec<T>, bool, u64)>>,
    print: impl Fn(&Out, &[T]),
) -> keyward_client::Result<()> {
    if let Some(mut pages) = all {
        let mut items = Vec::new();
        while let Some(page) = pages.next_page().await? {
            items.extend(page);
            out.progress(noun, pages.fetched());
        }
        out.progress_done();
        if out.json() {
            out.print_json(&serde_json::json!({ noun: items, "has_more": false }));
        } else {
            print(out, &items);
        }
        return Ok(());
    }
    let (page, items, has_more, offset) = one_page.await?;
    if out.json() {
        out.print_json(&page);
    } else {
        print(out, &items);
        if has_more {
            eprintln!("(more: --offset {} or --all)", offset + items.len() as u64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_to_the_largest_value_and_shows_any_use() {
        assert_eq!(sparkline(&[0, 0, 0]), "▁▁▁");
        assert_eq!(sparkline(&[0, 1, 7, 14]), "▁▂▅█");
        assert_eq!(sparkline(&[1, 1000]), "▂█");
        assert_eq!(sparkline(&[]), "");
    }

    #[test]
    fn colour_codes_take_no_room_in_a_column() {
        assert_eq!(visible_len("\x1b[32mactive\x1b[0m"), 6);
        assert_eq!(visible_len("plain"), 5);
    }
}
