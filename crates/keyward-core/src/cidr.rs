//! IP allowlists (API.md §6.1): parsing CIDR lists, checking a client address against one, and
//! deciding whether one allowlist is narrower than another.
//!
//! An empty allowlist means "any address". IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated
//! as the IPv4 addresses they carry, both in lists and in client addresses, because a dual-stack
//! listener reports IPv4 peers in that form and an operator who allowed `10.0.0.0/8` means them too.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

/// The most entries one allowlist may hold.
pub const MAX_ENTRIES: usize = 256;
/// How much of an offending item an error message quotes.
const MAX_QUOTED_LEN: usize = 64;

/// Why an allowlist was rejected. Messages name the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// An item is neither a CIDR nor a bare IP address.
    #[error("invalid CIDR or IP address `{item}`")]
    Invalid { item: String },
    /// The list has more than `MAX_ENTRIES` entries.
    #[error("too many CIDR entries: {count} (at most {max})")]
    TooMany { count: usize, max: usize },
}

/// Returns the IPv4 address an IPv4-mapped IPv6 address carries, and any other address unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        IpAddr::V4(_) => ip,
    }
}

/// Truncates a network to its network address and, when it lies entirely inside the IPv4-mapped
/// range `::ffff:0:0/96`, rewrites it as the equivalent IPv4 network.
fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.network().to_ipv4_mapped() {
                // The prefix is between 96 and 128, so the IPv4 prefix is between 0 and 32 and
                // `Ipv4Net::new` cannot fail; the fallback keeps the original net regardless.
                if let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

/// Parses one item: a CIDR, or a bare address meaning its /32 or /128.
fn parse_item(item: &str) -> Option<IpNet> {
    if let Ok(net) = IpNet::from_str(item) {
        return Some(net);
    }
    IpAddr::from_str(item).ok().map(IpNet::from)
}

/// Parses an allowlist: each item an IPv4/IPv6 CIDR or a bare address, at most `MAX_ENTRIES`.
/// Each entry is normalised to its network address, so `10.1.2.3/8` becomes `10.0.0.0/8`.
pub fn parse_allowlist(items: &[String]) -> Result<Vec<IpNet>, CidrError> {
    if items.len() > MAX_ENTRIES {
        return Err(CidrError::TooMany {
            count: items.len(),
            max: MAX_ENTRIES,
        });
    }
    items
        .iter()
        .map(|item| {
            parse_item(item)
                .map(canonical_net)
                .ok_or_else(|| CidrError::Invalid {
                    item: item.chars().take(MAX_QUOTED_LEN).collect(),
                })
        })
        .collect()
}

/// Whether the allowlist admits `ip`. An empty list admits every address.
pub fn allows(list: &[IpNet], ip: IpAddr) -> bool {
    if list.is_empty() {
        return true;
    }
    let ip = canonical_ip(ip);
    list.iter().any(|net| canonical_net(*net).contains(&ip))
}

/// Whether every address `child` admits is also admitted by `parent`.
///
/// An empty `parent` admits everything, so anything is a subset of it; an empty `child` admits
/// everything, so it is a subset only of an empty parent. Otherwise each child network must lie
/// inside one network of the aggregated parent, so that adjacent parent networks (two halves of a
/// /23, say) together cover their union.
pub fn is_subset(child: &[IpNet], parent: &[IpNet]) -> bool {
    if parent.is_empty() {
        return true;
    }
    if child.is_empty() {
        return false;
    }
    let parent: Vec<IpNet> = parent.iter().map(|n| canonical_net(*n)).collect();
    let merged = IpNet::aggregate(&parent);
    child.iter().all(|c| {
        let c = canonical_net(*c);
        merged.iter().any(|p| p.contains(&c))
    })
}

/// Renders an allowlist as CIDR text (`a.b.c.d/n`, `x::/n`), including /32 and /128 entries.
pub fn to_strings(list: &[IpNet]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ipnet::Ipv6Net;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn list(items: &[&str]) -> Vec<IpNet> {
        parse_allowlist(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_and_bare_addresses_parse_and_normalise() {
        let l = list(&["10.1.2.3/8", "192.168.0.1", "2001:db8::1/32", "::1"]);
        assert_eq!(
            to_strings(&l),
            vec!["10.0.0.0/8", "192.168.0.1/32", "2001:db8::/32", "::1/128"]
        );
    }

    #[test]
    fn ipv4_mapped_entries_become_ipv4() {
        let l = list(&["::ffff:10.0.0.0/104", "::ffff:1.2.3.4"]);
        assert_eq!(to_strings(&l), vec!["10.0.0.0/8", "1.2.3.4/32"]);
    }

    #[test]
    fn garbage_is_rejected_naming_the_item() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0",
            "example.com",
            " 10.0.0.1",
            "10.0.0.1/",
            "::1/129",
            "1.2.3.4/8/8",
        ] {
            let err = parse_allowlist(&[bad.to_string()]).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid CIDR or IP address `{bad}`")
            );
        }
    }

    #[test]
    fn lists_longer_than_the_maximum_are_rejected() {
        let items: Vec<String> = (0..=MAX_ENTRIES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert!(matches!(
            parse_allowlist(&items),
            Err(CidrError::TooMany { count: 257, .. })
        ));
        assert_eq!(
            parse_allowlist(&items[..MAX_ENTRIES]).unwrap().len(),
            MAX_ENTRIES
        );
    }

    #[test]
    fn empty_list_allows_any_address() {
        assert!(allows(&[], ip("1.2.3.4")));
        assert!(allows(&[], ip("::1")));
    }

    #[test]
    fn allows_checks_membership() {
        let l = list(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(allows(&l, ip("10.255.0.1")));
        assert!(!allows(&l, ip("11.0.0.1")));
        assert!(allows(&l, ip("2001:db8::42")));
        assert!(!allows(&l, ip("2001:db9::42")));
    }

    #[test]
    fn ipv4_mapped_client_addresses_match_ipv4_entries() {
        let l = list(&["10.0.0.0/8"]);
        assert!(allows(&l, ip("::ffff:10.1.2.3")));
        assert!(!allows(&l, ip("::ffff:11.1.2.3")));
        // An entry stored in mapped form still matches a plain IPv4 client.
        let raw = vec![IpNet::V6(
            Ipv6Net::new("::ffff:10.0.0.0".parse().unwrap(), 104).unwrap(),
        )];
        assert!(allows(&raw, ip("10.9.9.9")));
    }

    #[test]
    fn subset_rules_for_empty_lists() {
        let some = list(&["10.0.0.0/8"]);
        assert!(is_subset(&some, &[]));
        assert!(is_subset(&[], &[]));
        assert!(!is_subset(&[], &some));
    }

    #[test]
    fn adjacent_halves_cover_their_union() {
        let parent = list(&["10.0.0.0/24", "10.0.1.0/24"]);
        assert!(is_subset(&list(&["10.0.0.0/23"]), &parent));
        assert!(!is_subset(&list(&["10.0.0.0/22"]), &parent));
        assert!(is_subset(&list(&["10.0.1.7", "10.0.0.0/25"]), &parent));
        assert!(!is_subset(&list(&["10.0.2.1"]), &parent));
        assert!(!is_subset(&list(&["::ffff:10.0.2.1"]), &parent));
        assert!(is_subset(&list(&["::ffff:10.0.1.1"]), &parent));
    }

    #[test]
    fn families_do_not_mix() {
        assert!(!is_subset(&list(&["::/0"]), &list(&["0.0.0.0/0"])));
        assert!(!is_subset(&list(&["0.0.0.0/0"]), &list(&["::/0"])));
        assert!(is_subset(
            &list(&["1.2.3.4", "::1"]),
            &list(&["0.0.0.0/0", "::/0"])
        ));
    }

    fn v4_net() -> impl Strategy<Value = Ipv4Net> {
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, p)| Ipv4Net::new(Ipv4Addr::from(a), p).unwrap().trunc())
    }

    fn v6_net() -> impl Strategy<Value = Ipv6Net> {
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, p)| Ipv6Net::new(Ipv6Addr::from(a), p).unwrap().trunc())
    }

    proptest! {
        #[test]
        fn any_ipv4_subnet_of_a_parent_is_a_subset(parent in v4_net(), extra in 0u8..=32, bits in any::<u32>()) {
            let child_len = parent.prefix_len().saturating_add(extra).min(32);
            let host = bits & u32::from(parent.hostmask());
            let child = Ipv4Net::new(Ipv4Addr::from(u32::from(parent.network()) | host), child_len).unwrap();
            prop_assert!(is_subset(&[IpNet::V4(child)], &[IpNet::V4(parent)]));
            prop_assert!(allows(&[IpNet::V4(parent)], IpAddr::V4(child.addr())));
        }

        #[test]
        fn any_ipv6_subnet_of_a_parent_is_a_subset(parent in v6_net(), extra in 0u8..=128, bits in any::<u128>()) {
            let child_len = parent.prefix_len().saturating_add(extra).min(128);
            let host = bits & u128::from(parent.hostmask());
            let child = Ipv6Net::new(Ipv6Addr::from(u128::from(parent.network()) | host), child_len).unwrap();
            prop_assert!(is_subset(&[IpNet::V6(child)], &[IpNet::V6(parent)]));
        }

        #[test]
        fn a_net_is_never_a_subset_of_a_strictly_smaller_one(net in v4_net(), extra in 1u8..=32, bits in any::<u32>()) {
            prop_assume!(net.prefix_len() < 32);
            let smaller_len = net.prefix_len().saturating_add(extra).min(32);
            let host = bits & u32::from(net.hostmask());
            let smaller = Ipv4Net::new(Ipv4Addr::from(u32::from(net.network()) | host), smaller_len).unwrap();
            prop_assert!(!is_subset(&[IpNet::V4(net)], &[IpNet::V4(smaller)]));
        }

        #[test]
        fn an_ipv6_net_is_never_a_subset_of_a_strictly_smaller_one(net in v6_net(), extra in 1u8..=128, bits in any::<u128>()) {
            prop_assume!(net.prefix_len() < 128);
            let smaller_len = net.prefix_len().saturating_add(extra).min(128);
            let host = bits & u128::from(net.hostmask());
            let smaller = Ipv6Net::new(Ipv6Addr::from(u128::from(net.network()) | host), smaller_len).unwrap();
            prop_assert!(!is_subset(&[IpNet::V6(net)], &[IpNet::V6(smaller)]));
        }

        #[test]
        fn parsing_rendered_lists_round_trips(nets in prop::collection::vec(v4_net(), 0..8)) {
            let nets: Vec<IpNet> = nets.into_iter().map(IpNet::V4).collect();
            let again = parse_allowlist(&to_strings(&nets)).unwrap();
            prop_assert_eq!(again, nets);
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = parse_allowlist(&[s]);
        }
    }
}
