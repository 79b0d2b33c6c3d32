//! Walking offset-paginated lists (API.md §0): [`Pages`] fetches one page per
//! [`Pages::next_page`] call until the server says there is no more, so a caller can show
//! progress, stop early, or collect everything with [`Pages::all`].

use std::future::Future;
use std::pin::Pin;

use crate::Result;

/// The page size used when walking every page: the largest the API allows.
pub const MAX_PAGE: u32 = 1000;

type PageFuture<'a, T> = Pin<Box<dyn Future<Output = Result<(Vec<T>, bool)>> + Send + 'a>>;
type Fetch<'a, T> = Box<dyn FnMut(u64, u32) -> PageFuture<'a, T> + Send + 'a>;

/// The pages of a list, fetched one at a time.
///
/// ```no_run
/// # async fn demo(app: keyward_client::App) -> Result<(), keyward_client::Error> {
/// let mut pages = app.agents().pages(Default::default());
/// while let Some(agents) = pages.next_page().await? {
///     eprintln!("{} agents so far", pages.fetched());
///     # let _ = agents;
/// }
/// # Ok(()) }
/// ```
pub struct Pages<'a, T> {
    fetch: Fetch<'a, T>,
    offset: u64,
    limit: u32,
    done: bool,
    fetched: u64,
}

impl<T> std::fmt::Debug for Pages<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("offset", &self.offset)
            .field("limit", &self.limit)
            .field("done", &self.done)
            .finish()
    }
}

impl<'a, T> Pages<'a, T> {
    /// Pages starting at `offset`, `limit` items each; `fetch(offset, limit)` answers one page's
    /// items and whether more follow.
    pub(crate) fn new<F>(offset: u64, limit: u32, fetch: F) -> Pages<'a, T>
    where
        F: FnMut(u64, u32) -> PageFuture<'a, T> + Send + 'a,
    {
        Pages {
            fetch: Box::new(fetch),
            offset,
            limit,
            done: false,
            fetched: 0,
        }
    }

    /// The next page, or `None` once the server said there is no more.
    pub async fn next_page(&mut self) -> Result<Option<Vec<T>>> {
        if self.done {
            return Ok(None);
        }
        let (items, has_more) = (self.fetch)(self.offset, self.limit).await?;
        self.offset += items.len() as u64;
        self.fetched += items.len() as u64;
        // An empty page with has_more set would loop forever; a server never sends one, but
        // stopping here costs nothing.
        self.done = !has_more || items.is_empty();
        Ok(Some(items))
    }

    /// How many items the pages fetched so far held.
    pub fn fetched(&self) -> u64 {
        self.fetched
    }

    /// Every remaining item, walking all pages.
    pub async fn all(mut self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        while let Some(page) = self.next_page().await? {
            out.extend(page);
        }
        Ok(out)
    }
}
