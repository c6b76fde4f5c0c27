//! IPAM across many hosts: allocations never overlap and freed addresses come back.

use std::collections::BTreeSet;

use kiln_scheduler::{AddressesInUse, Ipam, ula_prefix_from_random};
use proptest::prelude::*;

proptest! {
    #[test]
    fn host_prefixes_never_overlap(global_id in any::<[u8; 5]>(), slots in 1_u32..200) {
        let ipam = Ipam::new(ula_prefix_from_random(global_id)).unwrap();
        let mut in_use = BTreeSet::new();
        let mut prefixes = Vec::new();
        for _ in 0..slots {
            let host = ipam.allocate_host(&in_use).unwrap();
            prop_assert!(ipam.cluster().contains(&host.ipv6));
            prop_assert!(in_use.insert(host.slot));
            prefixes.push(host);
        }
        for (i, a) in prefixes.iter().enumerate() {
            for b in &prefixes[i + 1..] {
                prop_assert!(!a.ipv6.contains(&b.ipv6.network()));
                prop_assert!(!a.ipv4.contains(&b.ipv4.network()));
            }
        }
    }

    #[test]
    fn freed_addresses_reused_referenced_never(
        operations in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..300),
    ) {
        let ipam = Ipam::with_host_ipv4_prefix_len(ula_prefix_from_random([1, 2, 3, 4, 5]), 26).unwrap();
        let host = ipam.host_prefixes(7).unwrap();
        let mut live = Vec::new();
        for (allocate, index) in operations {
            if allocate || live.is_empty() {
                let mut in_use = AddressesInUse::default();
                for pair in &live {
                    in_use.insert(*pair);
                }
                match ipam.allocate_instance(&host, &in_use) {
                    Ok(pair) => {
                        prop_assert!(!live.contains(&pair), "{pair:?} is still referenced");
                        live.push(pair);
                    }
                    Err(_) => prop_assert_eq!(live.len() as u32, ipam.instances_per_host()),
                }
            } else {
                live.swap_remove(index.index(live.len()));
            }
        }
    }
}
