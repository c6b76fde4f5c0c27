//! Backend choice: a pure function from the backends' loads to the order in which to try
//! them, so the policy is testable without sockets.

use rand::Rng;

use crate::config::Balance;

/// Load of one backend as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendLoad {
    /// Open connections through this ingress.
    pub active: u64,
    /// Whether a recent connect failed; such backends are tried after all others.
    pub cooling_down: bool,
}

/// Returns backend indexes in the order to try them: the policy's choice first, then the
/// rest from least to most loaded, with backends in cooldown last.
pub fn candidate_order(loads: &[BackendLoad], policy: Balance, rng: &mut impl Rng) -> Vec<usize> {
    // Sort key: healthy before cooling down, then fewer connections; ties broken at random so
    // equal backends share load.
    let tiebreak: Vec<u32> = loads.iter().map(|_| rng.r#gen()).collect();
    let key = |i: usize| (loads[i].cooling_down, loads[i].active, tiebreak[i]);
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&i| key(i));

    if policy == Balance::PowerOfTwoChoices && loads.len() > 2 {
        let first = rng.gen_range(0..loads.len());
        let mut second = rng.gen_range(0..loads.len() - 1);
        if second >= first {
            second += 1;
        }
        let chosen = if key(second) < key(first) {
            second
        } else {
            first
        };
        order.retain(|&i| i != chosen);
        order.insert(0, chosen);
    }
    order
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn load(active: u64) -> BackendLoad {
        BackendLoad {
            active,
            cooling_down: false,
        }
    }

    #[test]
    fn least_connections_orders_by_load() {
        let mut rng = StdRng::seed_from_u64(1);
        let loads = [load(5), load(1), load(3)];
        assert_eq!(
            candidate_order(&loads, Balance::LeastConnections, &mut rng),
            vec![1, 2, 0]
        );
    }

    #[test]
    fn cooling_down_backend_tried_last() {
        let mut rng = StdRng::seed_from_u64(1);
        let loads = [
            BackendLoad {
                active: 0,
                cooling_down: true,
            },
            load(9),
        ];
        for policy in [Balance::LeastConnections, Balance::PowerOfTwoChoices] {
            assert_eq!(
                candidate_order(&loads, policy, &mut rng),
                vec![1, 0],
                "{policy:?}"
            );
        }
    }

    #[test]
    fn power_of_two_never_picks_busiest() {
        let mut rng = StdRng::seed_from_u64(7);
        let loads = [load(0), load(1), load(100)];
        for _ in 0..1000 {
            let order = candidate_order(&loads, Balance::PowerOfTwoChoices, &mut rng);
            assert_ne!(order[0], 2, "the busiest backend loses every pair it is in");
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2], "every backend appears once");
        }
    }

    #[test]
    fn equal_loads_spread_choices() {
        let mut rng = StdRng::seed_from_u64(3);
        let loads = [load(0); 4];
        let mut firsts = [0u32; 4];
        for _ in 0..4000 {
            firsts[candidate_order(&loads, Balance::LeastConnections, &mut rng)[0]] += 1;
        }
        assert!(firsts.iter().all(|&n| n > 800), "first choices {firsts:?}");
    }

    #[test]
    fn no_backends_no_candidates() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(candidate_order(&[], Balance::PowerOfTwoChoices, &mut rng).is_empty());
    }
}
