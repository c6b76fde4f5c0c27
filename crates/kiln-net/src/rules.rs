//! The nftables ruleset for the instances on this host, built as data (pure, unit-tested) and
//! applied as one `nft -j -f -` transaction.
//!
//! Kiln owns two tables: `inet kiln` (anti-spoofing of IPv4 and IPv6, org isolation, guest to
//! host filtering, egress masquerade) and `arp kiln` (ARP anti-spoofing, which the `inet`
//! family never sees). Every change replaces both tables whole inside one transaction: the
//! kernel applies it atomically, so there is never a moment without rules, and a removed
//! instance cannot leave a stale rule behind.
//!
//! Named counters `spoofed` and `isolated` count the packets dropped by the anti-spoofing and
//! isolation rules, so operators and tests can see the rules at work.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kiln_core::OrgId;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{
    Chain, Counter, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetType, SetTypeValue,
    Table,
};
use nftables::stmt::{self, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::spec::{HostNetworkConfig, InstanceNetwork, TapName};

/// Name of both of Kiln's tables (`inet kiln` and `arp kiln`).
pub const TABLE: &str = "kiln";

/// Named counter of packets dropped because their source was not the guest's own.
pub const SPOOFED_COUNTER: &str = "spoofed";

/// Named counter of packets dropped because they crossed from one org to another.
pub const ISOLATED_COUNTER: &str = "isolated";

/// Set of every guest TAP on this host.
const GUEST_TAPS: &str = "guest_taps";

/// Priority of the anti-spoofing chain: before connection tracking (-200), so a spoofed packet
/// never creates a conntrack entry.
const ANTISPOOF_PRIORITY: i32 = -300;

/// ICMPv6 types a guest sends from a link-local or unspecified source while it configures
/// its interface (neighbor discovery and multicast listener reports).
const LINK_LOCAL_ICMPV6_TYPES: [&str; 5] = [
    "nd-router-solicit",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-report",
    "mld2-listener-report",
];

/// One instance as the ruleset sees it.
#[derive(Debug)]
pub struct GuestRules<'a> {
    /// The instance's TAP device.
    pub tap: &'a TapName,
    /// The instance's addresses and owner.
    pub network: &'a InstanceNetwork,
}

/// Builds the transaction that replaces Kiln's tables with the rules for `guests`.
///
/// With no guests the transaction only deletes the tables, so nothing of Kiln's remains.
pub fn build_ruleset(config: &HostNetworkConfig, guests: &[GuestRules<'_>]) -> Nftables {
    let mut commands = Vec::new();
    for family in [NfFamily::INet, NfFamily::ARP] {
        // Adding first makes the delete succeed whether or not the table exists.
        commands.push(add(NfListObject::Table(table(family))));
        commands.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
            table(family),
        ))));
    }
    if guests.is_empty() {
        return Nftables { objects: commands };
    }

    commands.extend(inet_table(config, guests));
    commands.extend(arp_table(guests));
    Nftables { objects: commands }
}

fn inet_table(config: &HostNetworkConfig, guests: &[GuestRules<'_>]) -> Vec<NfObject> {
    let family = NfFamily::INet;
    let mut objects = vec![add(NfListObject::Table(table(family)))];
    for name in [SPOOFED_COUNTER, ISOLATED_COUNTER] {
        objects.push(add(NfListObject::Counter(Counter {
            family,
            table: TABLE.to_owned(),
            name: name.to_owned(),
            handle: None,
            packets: None,
            bytes: None,
        })));
    }

    let all_taps: Vec<&TapName> = guests.iter().map(|guest| guest.tap).collect();
    objects.push(add(NfListObject::Set(ifname_set(GUEST_TAPS, &all_taps))));
    let mut orgs: BTreeMap<OrgId, Vec<&TapName>> = BTreeMap::new();
    for guest in guests {
        orgs.entry(guest.network.org).or_default().push(guest.tap);
    }
    for (org, taps) in &orgs {
        objects.push(add(NfListObject::Set(ifname_set(&org_set(*org), taps))));
    }

    objects.push(add(NfListObject::Chain(base_chain(
        family,
        "antispoof",
        NfChainType::Filter,
        NfHook::Prerouting,
        ANTISPOOF_PRIORITY,
    ))));
    // TODO(performance): every packet walks the rules of every TAP in order; a verdict map
    // keyed by interface name would make the lookup constant with hundreds of instances.
    for guest in guests {
        for expr in antispoof_rules(guest) {
            objects.push(rule(family, "antispoof", expr));
        }
    }

    objects.push(add(NfListObject::Chain(base_chain(
        family,
        "isolate",
        NfChainType::Filter,
        NfHook::Forward,
        0,
    ))));
    for org in orgs.keys() {
        // A packet from this org's guest to any guest TAP outside the org is dropped.
        let org_taps = set_ref(&org_set(*org));
        objects.push(rule(
            family,
            "isolate",
            vec![
                matches(meta(MetaKey::Iifname), Operator::EQ, org_taps.clone()),
                matches(meta(MetaKey::Oifname), Operator::EQ, set_ref(GUEST_TAPS)),
                matches(meta(MetaKey::Oifname), Operator::NEQ, org_taps),
                named_counter(ISOLATED_COUNTER),
                Statement::Drop(None),
            ],
        ));
    }

    objects.push(add(NfListObject::Chain(base_chain(
        family,
        "guest_input",
        NfChainType::Filter,
        NfHook::Input,
        0,
    ))));
    objects.extend(guest_input_rules(family));

    objects.push(add(NfListObject::Chain(base_chain(
        family,
        "egress",
        NfChainType::NAT,
        NfHook::Postrouting,
        100,
    ))));
    let leaves_host = match &config.egress_interface {
        Some(interface) => matches(meta(MetaKey::Oifname), Operator::EQ, string(interface)),
        None => matches(meta(MetaKey::Oifname), Operator::NEQ, set_ref(GUEST_TAPS)),
    };
    objects.push(rule(
        family,
        "egress",
        vec![
            matches(meta(MetaKey::Iifname), Operator::EQ, set_ref(GUEST_TAPS)),
            leaves_host,
            Statement::Masquerade(None),
        ],
    ));
    objects
}

/// Rules that let a guest send only from its own MAC and addresses.
fn antispoof_rules(guest: &GuestRules<'_>) -> Vec<Vec<Statement>> {
    let from_tap = || {
        matches(
            meta(MetaKey::Iifname),
            Operator::EQ,
            string(guest.tap.as_str()),
        )
    };
    let network = guest.network;
    let mut rules = vec![
        vec![
            from_tap(),
            matches(
                payload("ether", "saddr"),
                Operator::NEQ,
                string(&network.mac.to_string()),
            ),
            named_counter(SPOOFED_COUNTER),
            Statement::Drop(None),
        ],
        vec![
            from_tap(),
            matches(
                payload("ip6", "saddr"),
                Operator::EQ,
                string(&network.ipv6.to_string()),
            ),
            Statement::Accept(None),
        ],
        vec![
            from_tap(),
            matches(
                payload("ip6", "saddr"),
                Operator::EQ,
                anonymous_set(vec![
                    string("::"),
                    Expression::Named(NamedExpression::Prefix(Prefix {
                        addr: Box::new(string("fe80::")),
                        len: 10,
                    })),
                ]),
            ),
            matches(
                payload("icmpv6", "type"),
                Operator::EQ,
                anonymous_set(LINK_LOCAL_ICMPV6_TYPES.iter().map(|t| string(t)).collect()),
            ),
            Statement::Accept(None),
        ],
        vec![
            from_tap(),
            matches(meta(MetaKey::Nfproto), Operator::EQ, string("ipv6")),
            named_counter(SPOOFED_COUNTER),
            Statement::Drop(None),
        ],
    ];
    if let Some(ipv4) = network.ipv4 {
        rules.push(vec![
            from_tap(),
            matches(
                payload("ip", "saddr"),
                Operator::EQ,
                string(&ipv4.to_string()),
            ),
            Statement::Accept(None),
        ]);
    }
    rules.push(vec![
        from_tap(),
        matches(meta(MetaKey::Nfproto), Operator::EQ, string("ipv4")),
        named_counter(SPOOFED_COUNTER),
        Statement::Drop(None),
    ]);
    rules
}

/// Rules that keep guests away from the host's own services: a guest may answer connections
/// the host opened (health checks) and send ICMP, nothing else.
fn guest_input_rules(family: NfFamily) -> Vec<NfObject> {
    let from_guest = || matches(meta(MetaKey::Iifname), Operator::EQ, set_ref(GUEST_TAPS));
    vec![
        rule(
            family,
            "guest_input",
            vec![
                from_guest(),
                matches(
                    Expression::Named(NamedExpression::CT(nftables::expr::CT {
                        key: "state".to_owned(),
                        family: None,
                        dir: None,
                    })),
                    Operator::IN,
                    Expression::List(vec![string("established"), string("related")]),
                ),
                Statement::Accept(None),
            ],
        ),
        rule(
            family,
            "guest_input",
            vec![
                from_guest(),
                matches(
                    meta(MetaKey::L4proto),
                    Operator::EQ,
                    anonymous_set(vec![string("icmp"), string("ipv6-icmp")]),
                ),
                Statement::Accept(None),
            ],
        ),
        rule(
            family,
            "guest_input",
            vec![from_guest(), Statement::Drop(None)],
        ),
    ]
}

fn arp_table(guests: &[GuestRules<'_>]) -> Vec<NfObject> {
    let family = NfFamily::ARP;
    let mut objects = vec![
        add(NfListObject::Table(table(family))),
        add(NfListObject::Counter(Counter {
            family,
            table: TABLE.to_owned(),
            name: SPOOFED_COUNTER.to_owned(),
            handle: None,
            packets: None,
            bytes: None,
        })),
        add(NfListObject::Chain(base_chain(
            family,
            "antispoof",
            NfChainType::Filter,
            NfHook::Input,
            0,
        ))),
    ];
    for guest in guests {
        let from_tap = || {
            matches(
                meta(MetaKey::Iifname),
                Operator::EQ,
                string(guest.tap.as_str()),
            )
        };
        objects.push(rule(
            family,
            "antispoof",
            vec![
                from_tap(),
                matches(
                    payload("arp", "saddr ether"),
                    Operator::NEQ,
                    string(&guest.network.mac.to_string()),
                ),
                named_counter(SPOOFED_COUNTER),
                Statement::Drop(None),
            ],
        ));
        let sender_check = match guest.network.ipv4 {
            Some(ipv4) => matches(
                payload("arp", "saddr ip"),
                Operator::NEQ,
                string(&IpAddr::V4(ipv4).to_string()),
            ),
            // A guest without IPv4 has no business sending ARP at all.
            None => matches(
                meta(MetaKey::Iifname),
                Operator::EQ,
                string(guest.tap.as_str()),
            ),
        };
        objects.push(rule(
            family,
            "antispoof",
            vec![
                from_tap(),
                sender_check,
                named_counter(SPOOFED_COUNTER),
                Statement::Drop(None),
            ],
        ));
    }
    objects
}

/// Name of the set holding the TAPs of one org's instances.
fn org_set(org: OrgId) -> String {
    format!("org_{}", org.as_uuid().simple())
}

fn table(family: NfFamily) -> Table {
    Table {
        family,
        name: TABLE.to_owned(),
        handle: None,
    }
}

fn base_chain(
    family: NfFamily,
    name: &str,
    chain_type: NfChainType,
    hook: NfHook,
    priority: i32,
) -> Chain {
    Chain {
        family,
        table: TABLE.to_owned(),
        name: name.to_owned(),
        newname: None,
        handle: None,
        _type: Some(chain_type),
        hook: Some(hook),
        prio: Some(priority),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }
}

fn ifname_set(name: &str, taps: &[&TapName]) -> Set {
    Set {
        family: NfFamily::INet,
        table: TABLE.to_owned(),
        name: name.to_owned(),
        handle: None,
        set_type: SetTypeValue::Single(SetType::Ifname),
        policy: None,
        flags: None,
        elem: Some(taps.iter().map(|tap| string(tap.as_str())).collect()),
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }
}

fn rule(family: NfFamily, chain: &str, expr: Vec<Statement>) -> NfObject {
    add(NfListObject::Rule(Rule {
        family,
        table: TABLE.to_owned(),
        chain: chain.to_owned(),
        expr,
        handle: None,
        index: None,
        comment: None,
    }))
}

fn add(object: NfListObject) -> NfObject {
    NfObject::CmdObject(NfCmd::Add(object))
}

fn matches(left: Expression, op: Operator, right: Expression) -> Statement {
    Statement::Match(Match { left, right, op })
}

fn meta(key: MetaKey) -> Expression {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &str, field: &str) -> Expression {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.to_owned(),
            field: field.to_owned(),
        },
    )))
}

fn string(value: &str) -> Expression {
    Expression::String(value.to_owned())
}

fn set_ref(name: &str) -> Expression {
    Expression::String(format!("@{name}"))
}

fn anonymous_set(items: Vec<Expression>) -> Expression {
    Expression::Named(NamedExpression::Set(
        items
            .into_iter()
            .map(nftables::expr::SetItem::Element)
            .collect(),
    ))
}

fn named_counter(name: &str) -> Statement {
    Statement::Counter(stmt::Counter::Named(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use kiln_core::InstanceId;

    use super::*;
    use crate::spec::{MacAddr, TapPrefix};

    fn guest(org: OrgId, last: u8) -> (TapName, InstanceNetwork) {
        let instance = InstanceId::new();
        let network = InstanceNetwork {
            instance,
            org,
            mac: MacAddr::for_instance(instance),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, u16::from(last)),
            ipv4: Some(Ipv4Addr::new(100, 64, 0, last)),
        };
        (
            TapName::for_instance(&TapPrefix::default(), instance),
            network,
        )
    }

    fn rules_json(guests: &[(TapName, InstanceNetwork)]) -> String {
        let rules: Vec<GuestRules<'_>> = guests
            .iter()
            .map(|(tap, network)| GuestRules { tap, network })
            .collect();
        serde_json::to_string(&build_ruleset(&HostNetworkConfig::default(), &rules)).unwrap()
    }

    #[test]
    fn empty_host_only_deletes_tables() {
        let json = rules_json(&[]);
        assert_eq!(json.matches("\"delete\"").count(), 2);
        assert!(!json.contains("\"rule\""));
    }

    #[test]
    fn each_org_gets_one_isolation_rule() {
        let (a, b) = (OrgId::new(), OrgId::new());
        let guests = [guest(a, 2), guest(a, 3), guest(b, 4)];
        let json = rules_json(&guests);
        assert_eq!(json.matches("\"chain\":\"isolate\"").count(), 2);
        assert!(json.contains(&org_set(a)));
        assert!(json.contains(&org_set(b)));
    }

    #[test]
    fn antispoof_names_assigned_addresses() {
        let guests = [guest(OrgId::new(), 7)];
        let json = rules_json(&guests);
        assert!(json.contains("\"fd00:0:0:1::7\""));
        assert!(json.contains("\"100.64.0.7\""));
        assert!(json.contains(&guests[0].1.mac.to_string()));
    }
}
