//! Which addresses a webhook may reach. The gateway sits inside the vendor's network, so a
//! webhook URL is a way to make it send requests: to its own loopback services, the LAN, the
//! cloud's instance-metadata service. Those are refused unless the admin allowed private
//! targets for that webhook; metadata, unspecified, multicast, broadcast and reserved
//! addresses are refused always (no receiver lives there; `0.0.0.0` even reaches loopback).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    LinkLocal,
    /// RFC 1918 (and the deprecated IPv6 site-local range).
    Private,
    /// IPv6 unique local, fc00::/7.
    UniqueLocal,
    /// Carrier-grade NAT, 100.64.0.0/10.
    SharedCgnat,
    /// A cloud's instance-metadata service.
    Metadata,
    Unspecified,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, future-use and IETF protocol ranges.
    Reserved,
}

impl AddressClass {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Loopback => "loopback",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Private => "private",
            AddressClass::UniqueLocal => "unique local",
            AddressClass::SharedCgnat => "carrier-grade NAT",
            AddressClass::Metadata => "cloud metadata",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Reserved => "reserved",
        }
    }

    /// Whether `--allow-private` lifts the refusal (the rest are refused always).
    pub fn allowed_with_private(self) -> bool {
        matches!(
            self,
            AddressClass::Loopback
                | AddressClass::LinkLocal
                | AddressClass::Private
                | AddressClass::UniqueLocal
                | AddressClass::SharedCgnat
        )
    }
}

/// The address's class when it is not an ordinary public unicast address.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// None: the address may be a target. Some(class): it is refused, given `allow_private`.
pub fn refused(ip: IpAddr, allow_private: bool) -> Option<AddressClass> {
    classify(ip).filter(|c| !(allow_private && c.allowed_with_private()))
}

/// Known instance-metadata addresses: AWS/GCP/Azure/OpenStack, AWS ECS task metadata,
/// Alibaba Cloud, Oracle Cloud.
const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(192, 0, 0, 192),
];
/// AWS's IPv6 instance-metadata address.
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if METADATA_V4.contains(&ip) => AddressClass::Metadata,
        _ if ip.is_broadcast() => AddressClass::Broadcast,
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) => AddressClass::Private,
        (172, 16..=31, _) => AddressClass::Private,
        (192, 168, _) => AddressClass::Private,
        (169, 254, _) => AddressClass::LinkLocal,
        (100, 64..=127, _) => AddressClass::SharedCgnat,
        (224..=239, _, _) => AddressClass::Multicast,
        (240..=255, _, _) => AddressClass::Reserved,
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressClass::Reserved,
        (198, 18..=19, _) => AddressClass::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    if METADATA_V6.contains(&ip) {
        return Some(AddressClass::Metadata);
    }
    if ip.is_unspecified() {
        return Some(AddressClass::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddressClass::Loopback);
    }
    // An IPv4 address carried in IPv6 reaches the IPv4 address: judge that one.
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        0xfe80..=0xfebf => AddressClass::LinkLocal,
        0xfec0..=0xfeff => AddressClass::Private,
        0xfc00..=0xfdff => AddressClass::UniqueLocal,
        0xff00..=0xffff => AddressClass::Multicast,
        // Documentation 2001:db8::/32 and the rest of ::/8 (IPv4-compatible, discard…).
        0x2001 if s[1] == 0x0db8 => AddressClass::Reserved,
        0x0000..=0x00ff => AddressClass::Reserved,
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address stands for: IPv4-mapped `::ffff:a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d` and 6to4 `2002:AABB:CCDD::`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let from = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        [0x2002, hi, lo, ..] => Some(from(hi, lo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<AddressClass> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn public_addresses_pass() {
        for ok in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "169.253.1.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
        ] {
            assert_eq!(class(ok), None, "{ok}");
        }
    }

    #[test]
    fn every_named_class_is_caught() {
        use AddressClass::*;
        for (ip, want) in [
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("::1", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("fec0::1", Private),
            ("169.254.1.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("fd12:3456::1", UniqueLocal),
            ("fc00::1", UniqueLocal),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.254", SharedCgnat),
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("100.100.100.200", Metadata),
            ("192.0.0.192", Metadata),
            ("fd00:ec2::254", Metadata),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("224.0.0.1", Multicast),
            ("ff02::1", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.2.10", Reserved),
            ("198.18.0.1", Reserved),
            ("2001:db8::1", Reserved),
        ] {
            assert_eq!(class(ip), Some(want), "{ip}");
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_as_ipv4() {
        use AddressClass::*;
        assert_eq!(class("::ffff:127.0.0.1"), Some(Loopback));
        assert_eq!(class("::ffff:169.254.169.254"), Some(Metadata));
        assert_eq!(class("64:ff9b::10.0.0.1"), Some(Private));
        assert_eq!(class("2002:a9fe:a9fe::1"), Some(Metadata));
        assert_eq!(class("::ffff:8.8.8.8"), None);
        assert_eq!(class("2002:0808:0808::1"), None);
    }

    #[test]
    fn allow_private_lifts_only_the_private_classes() {
        let r = |s: &str, allow| refused(s.parse().unwrap(), allow);
        for private in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "fd12::1",
            "169.254.1.1",
            "100.64.0.1",
        ] {
            assert!(r(private, false).is_some(), "{private}");
            assert_eq!(r(private, true), None, "{private}");
        }
        for never in [
            "169.254.169.254",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(r(never, true).is_some(), "{never}");
        }
        assert_eq!(r("8.8.8.8", false), None);
    }
}
