//! IPAM persistence: the cluster prefix, host slots and instance addresses in PostgreSQL.
//!
//! The pure allocator (`kiln_scheduler::Ipam`) picks the lowest free slot or address from what
//! these tables say is in use; this module reads that set, asks the allocator and inserts the
//! result. Call these functions inside the transaction that appends the matching event
//! (`HostRegistered`, `InstancePlaced`, `InstanceRemoved`), so an allocation exists exactly
//! when its event does. A transaction-scoped advisory lock serializes slot allocation and host
//! release against everything else; instance placements take it shared and rely on the
//! orchestrator's [`AddressBook`]. The tables' UNIQUE constraints reject a duplicate even if a
//! caller forgets the transaction.
//!
//! Every allocation is idempotent per host or instance: asking again returns the same answer,
//! which is what a resumed deploy step needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};

use ipnet::Ipv6Net;
use kiln_core::{EnvId, HostId, InstanceId};
use kiln_scheduler::{AddressesInUse, HostPrefixes, InstanceAddresses, Ipam, IpamError};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// Key of the advisory lock that serializes IPAM allocations ("kilnipam" in ASCII).
const IPAM_LOCK_KEY: i64 = 0x6b69_6c6e_6970_616d;

/// Error of an IPAM operation.
#[derive(Debug, thiserror::Error)]
pub enum IpamStoreError {
    /// A query failed.
    #[error("IPAM query failed: {operation}")]
    Query {
        /// The purpose of the query.
        operation: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// The allocator found nothing free, or rejected the stored prefix.
    #[error("IPAM allocation failed")]
    Allocation(#[source] IpamError),
    /// The cluster prefix was never chosen.
    #[error("the cluster has no address prefix yet; bootstrap the control plane first")]
    NoClusterPrefix,
    /// A stored value does not parse.
    #[error("invalid stored IPAM value {value:?} in {column}")]
    CorruptRow {
        /// The column.
        column: &'static str,
        /// The stored text.
        value: String,
    },
    /// The address book dropped a host while a batch was allocating on it, after a duplicate
    /// in another batch. The batch is not stored.
    #[error(
        "the address book forgot host {host} while allocating on it; the next pass places \
         these instances again"
    )]
    BookChanged {
        /// The host.
        host: HostId,
    },
    /// A host slot cannot be freed while instances on it hold addresses.
    #[error(
        "host {host} still has {count} instance addresses allocated; remove its instances \
         before releasing its prefixes"
    )]
    HostStillReferenced {
        /// The host.
        host: HostId,
        /// Instance addresses still allocated on it.
        count: i64,
    },
}

fn query_failed(operation: &'static str) -> impl FnOnce(sqlx::Error) -> IpamStoreError {
    move |source| IpamStoreError::Query { operation, source }
}

async fn lock(conn: &mut PgConnection) -> Result<(), IpamStoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(IPAM_LOCK_KEY)
        .execute(conn)
        .await
        .map_err(query_failed("take the IPAM lock"))?;
    Ok(())
}

/// Chooses the cluster prefix from `global_id` (40 random bits) unless one exists, and returns
/// the allocator for the stored prefix. The first call wins; later calls ignore `global_id`.
pub async fn bootstrap(
    conn: &mut PgConnection,
    global_id: [u8; 5],
) -> Result<Ipam, IpamStoreError> {
    let ipam = Ipam::new(kiln_scheduler::ula_prefix_from_random(global_id))
        .map_err(IpamStoreError::Allocation)?;
    sqlx::query(
        "INSERT INTO ipam_cluster (prefix, host_ipv4_prefix_len) VALUES ($1, $2) \
         ON CONFLICT (singleton) DO NOTHING",
    )
    .bind(ipam.cluster().to_string())
    .bind(i16::from(
        kiln_scheduler::ipam::DEFAULT_HOST_IPV4_PREFIX_LEN,
    ))
    .execute(&mut *conn)
    .await
    .map_err(query_failed("store the cluster prefix"))?;

    load(conn).await
}

/// Loads the allocator for the stored cluster prefix.
pub async fn load(conn: &mut PgConnection) -> Result<Ipam, IpamStoreError> {
    let row = sqlx::query("SELECT prefix, host_ipv4_prefix_len FROM ipam_cluster")
        .fetch_optional(conn)
        .await
        .map_err(query_failed("read the cluster prefix"))?
        .ok_or(IpamStoreError::NoClusterPrefix)?;

    let text: String = row.get("prefix");
    let prefix: Ipv6Net = text.parse().map_err(|_| IpamStoreError::CorruptRow {
        column: "ipam_cluster.prefix",
        value: text.clone(),
    })?;
    let len: i16 = row.get("host_ipv4_prefix_len");
    let len = u8::try_from(len).map_err(|_| IpamStoreError::CorruptRow {
        column: "ipam_cluster.host_ipv4_prefix_len",
        value: len.to_string(),
    })?;
    Ipam::with_host_ipv4_prefix_len(prefix, len).map_err(IpamStoreError::Allocation)
}

/// Returns the prefixes of a host, allocating its slot on first use.
pub async fn host_prefixes(
    conn: &mut PgConnection,
    ipam: &Ipam,
    host: HostId,
) -> Result<HostPrefixes, IpamStoreError> {
    lock(conn).await?;

    let existing: Option<i32> =
        sqlx::query_scalar("SELECT slot FROM ipam_host_slots WHERE host_id = $1")
            .bind(host.as_uuid())
            .fetch_optional(&mut *conn)
            .await
            .map_err(query_failed("read the host's slot"))?;
    if let Some(slot) = existing {
        let slot = u32::try_from(slot).map_err(|_| IpamStoreError::CorruptRow {
            column: "ipam_host_slots.slot",
            value: slot.to_string(),
        })?;
        return ipam.host_prefixes(slot).map_err(IpamStoreError::Allocation);
    }

    let slots: Vec<i32> = sqlx::query_scalar("SELECT slot FROM ipam_host_slots")
        .fetch_all(&mut *conn)
        .await
        .map_err(query_failed("read the slots in use"))?;
    let in_use: BTreeSet<u32> = slots
        .into_iter()
        .filter_map(|slot| u32::try_from(slot).ok())
        .collect();
    let prefixes = ipam
        .allocate_host(&in_use)
        .map_err(IpamStoreError::Allocation)?;

    sqlx::query("INSERT INTO ipam_host_slots (host_id, slot) VALUES ($1, $2)")
        .bind(host.as_uuid())
        .bind(i32::try_from(prefixes.slot).unwrap_or(i32::MAX))
        .execute(conn)
        .await
        .map_err(query_failed("store the host's slot"))?;
    Ok(prefixes)
}

/// Records that a host uses `slot` (for example the subnet of the /64 it was given at
/// registration) unless it already has one, and returns its prefixes.
pub async fn adopt_host_slot(
    conn: &mut PgConnection,
    ipam: &Ipam,
    host: HostId,
    slot: u32,
) -> Result<HostPrefixes, IpamStoreError> {
    ipam.host_prefixes(slot)
        .map_err(IpamStoreError::Allocation)?;
    sqlx::query(
        "INSERT INTO ipam_host_slots (host_id, slot) VALUES ($1, $2) \
         ON CONFLICT (host_id) DO NOTHING",
    )
    .bind(host.as_uuid())
    .bind(i32::try_from(slot).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await
    .map_err(query_failed("adopt the host's slot"))?;
    host_prefixes(conn, ipam, host).await
}

/// Frees a host's slot; fails while instances on it still hold addresses.
pub async fn release_host(conn: &mut PgConnection, host: HostId) -> Result<bool, IpamStoreError> {
    lock(conn).await?;

    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ipam_instance_addresses WHERE host_id = $1")
            .bind(host.as_uuid())
            .fetch_one(&mut *conn)
            .await
            .map_err(query_failed("count the host's instance addresses"))?;
    if count > 0 {
        return Err(IpamStoreError::HostStillReferenced { host, count });
    }

    let deleted = sqlx::query("DELETE FROM ipam_host_slots WHERE host_id = $1")
        .bind(host.as_uuid())
        .execute(conn)
        .await
        .map_err(query_failed("free the host's slot"))?;
    Ok(deleted.rows_affected() > 0)
}

/// Returns the addresses of an instance, allocating them inside its host's prefixes on first use.
/// It reads the host's addresses from the table and bypasses the orchestrator's address book,
/// so only tests call it, as an allocator of an earlier leader.
#[cfg(test)]
async fn instance_addresses(
    conn: &mut PgConnection,
    ipam: &Ipam,
    env: EnvId,
    host: HostId,
    instance: InstanceId,
) -> Result<InstanceAddresses, IpamStoreError> {
    let prefixes = host_prefixes(conn, ipam, host).await?;

    let existing =
        sqlx::query("SELECT ipv6, ipv4 FROM ipam_instance_addresses WHERE instance_id = $1")
            .bind(instance.as_uuid())
            .fetch_optional(&mut *conn)
            .await
            .map_err(query_failed("read the instance's addresses"))?;
    if let Some(row) = existing {
        return parse_pair(row.get("ipv6"), row.get("ipv4"));
    }

    let rows = sqlx::query("SELECT ipv6, ipv4 FROM ipam_instance_addresses WHERE host_id = $1")
        .bind(host.as_uuid())
        .fetch_all(&mut *conn)
        .await
        .map_err(query_failed("read the host's addresses in use"))?;
    let mut in_use = AddressesInUse::default();
    for row in rows {
        in_use.insert(parse_pair(row.get("ipv6"), row.get("ipv4"))?);
    }
    let pair = ipam
        .allocate_instance(&prefixes, &in_use)
        .map_err(IpamStoreError::Allocation)?;

    sqlx::query(
        "INSERT INTO ipam_instance_addresses (instance_id, env_id, host_id, ipv6, ipv4) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(instance.as_uuid())
    .bind(env.as_uuid())
    .bind(host.as_uuid())
    .bind(pair.ipv6.to_string())
    .bind(pair.ipv4.to_string())
    .execute(conn)
    .await
    .map_err(query_failed("store the instance's addresses"))?;
    Ok(pair)
}

/// Addresses in use per host as this process has recorded them: read from the table once per host,
/// then kept up to date by [`place_instances`] and [`AddressBook::free`].
///
/// Only the leader's orchestrator allocates instance addresses. A new leader, or a replica
/// that leads again after another did, builds a new book once the earlier leader's
/// transactions have ended (the fencing token sees to that), so when the book reads a host it
/// misses no committed allocation. Allocations of a failed transaction are freed again by the
/// caller. After a host is read again, an older batch's free can still drop a pair that a
/// newer batch holds, so the book can be wrong for a while. The table's UNIQUE constraints
/// reject the duplicate that could follow, and the hosts of that batch are read again.
#[derive(Debug, Default)]
pub struct AddressBook {
    hosts: Mutex<HashMap<HostId, AddressesInUse>>,
}

impl AddressBook {
    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, AddressesInUse>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the addresses of removed instances free again, once their removal committed.
    pub fn free(&self, freed: &[(HostId, InstanceAddresses)]) {
        let mut hosts = self.hosts();
        for (host, pair) in freed {
            if let Some(in_use) = hosts.get_mut(host) {
                in_use.ipv6.remove(&pair.ipv6);
                in_use.ipv4.remove(&pair.ipv4);
            }
        }
    }

    /// Forgets the hosts, so they are read from the table again.
    fn forget_hosts(&self, forgotten: &[HostId]) {
        let mut hosts = self.hosts();
        for host in forgotten {
            hosts.remove(host);
        }
    }
}

/// The outcome of [`place_instances`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The addresses of each instance, in the order asked.
    pub pairs: Vec<InstanceAddresses>,
    /// The addresses allocated by this call, to hand to [`AddressBook::free`] when the
    /// transaction does not commit.
    pub allocated: Vec<(HostId, InstanceAddresses)>,
}

/// Returns the addresses of several instances of `env`, in the order of `instances`, each
/// given as its host, the host's slot (adopted as [`adopt_host_slot`] does) and the instance.
/// An instance that has addresses keeps them; the others get the lowest free ones of their
/// host according to `book`.
///
/// Placements take the IPAM lock shared: they exclude slot allocation and host release, not
/// each other, because `book` hands each address out once. A batch costs five statements
/// however many instances it has, plus one read of the hosts the book has not seen yet.
pub async fn place_instances(
    conn: &mut PgConnection,
    ipam: &Ipam,
    book: &AddressBook,
    env: EnvId,
    instances: &[(HostId, u32, InstanceId)],
) -> Result<Placed, IpamStoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(IPAM_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(query_failed("take the IPAM lock"))?;

    let mut host_slots: BTreeMap<HostId, u32> = BTreeMap::new();
    for (host, slot, _) in instances {
        host_slots.entry(*host).or_insert(*slot);
    }
    let hosts: Vec<Uuid> = host_slots.keys().map(|host| host.as_uuid()).collect();
    let slots: Vec<i32> = host_slots
        .values()
        .map(|slot| i32::try_from(*slot).unwrap_or(i32::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO ipam_host_slots (host_id, slot) SELECT * FROM unnest($1::uuid[], $2::int[]) \
         ON CONFLICT (host_id) DO NOTHING",
    )
    .bind(&hosts)
    .bind(&slots)
    .execute(&mut *conn)
    .await
    .map_err(query_failed("adopt the hosts' slots"))?;

    // The slot a host already had wins over the one passed in, as in `adopt_host_slot`.
    let rows = sqlx::query("SELECT host_id, slot FROM ipam_host_slots WHERE host_id = ANY($1)")
        .bind(&hosts)
        .fetch_all(&mut *conn)
        .await
        .map_err(query_failed("read the hosts' slots"))?;
    let mut prefixes: BTreeMap<HostId, HostPrefixes> = BTreeMap::new();
    for row in rows {
        let slot: i32 = row.get("slot");
        let slot = u32::try_from(slot).map_err(|_| IpamStoreError::CorruptRow {
            column: "ipam_host_slots.slot",
            value: slot.to_string(),
        })?;
        let host = HostId::from_uuid(row.get("host_id"));
        prefixes.insert(
            host,
            ipam.host_prefixes(slot)
                .map_err(IpamStoreError::Allocation)?,
        );
    }

    let ids: Vec<Uuid> = instances.iter().map(|(_, _, id)| id.as_uuid()).collect();
    let rows = sqlx::query(
        "SELECT instance_id, ipv6, ipv4 FROM ipam_instance_addresses WHERE instance_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(query_failed("read the instances' addresses"))?;
    let mut existing: BTreeMap<InstanceId, InstanceAddresses> = BTreeMap::new();
    for row in rows {
        let pair = parse_pair(row.get("ipv6"), row.get("ipv4"))?;
        existing.insert(InstanceId::from_uuid(row.get("instance_id")), pair);
    }

    let unseen: Vec<Uuid> = {
        let known = book.hosts();
        host_slots
            .keys()
            .filter(|host| !known.contains_key(host))
            .map(|host| host.as_uuid())
            .collect()
    };
    if !unseen.is_empty() {
        let rows = sqlx::query(
            "SELECT host_id, ipv6, ipv4 FROM ipam_instance_addresses WHERE host_id = ANY($1)",
        )
        .bind(&unseen)
        .fetch_all(&mut *conn)
        .await
        .map_err(query_failed("read the hosts' addresses in use"))?;
        let mut read: HashMap<HostId, AddressesInUse> = unseen
            .iter()
            .map(|host| (HostId::from_uuid(*host), AddressesInUse::default()))
            .collect();
        for row in rows {
            let pair = parse_pair(row.get("ipv6"), row.get("ipv4"))?;
            read.entry(HostId::from_uuid(row.get("host_id")))
                .or_default()
                .insert(pair);
        }
        // Merged, not replaced: a concurrent batch may have allocated on the host since.
        let mut known = book.hosts();
        for (host, in_use) in read {
            let entry = known.entry(host).or_default();
            entry.ipv6.extend(in_use.ipv6);
            entry.ipv4.extend(in_use.ipv4);
        }
    }

    let mut pairs = Vec::with_capacity(instances.len());
    let mut allocated = Vec::new();
    let (mut new_ids, mut new_hosts, mut new_v6, mut new_v4) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    {
        let mut known = book.hosts();
        for (host, _, instance) in instances {
            if let Some(pair) = existing.get(instance) {
                pairs.push(*pair);
                continue;
            }
            let host_prefixes = prefixes
                .get(host)
                .ok_or_else(|| IpamStoreError::CorruptRow {
                    column: "ipam_host_slots.host_id",
                    value: format!("{host} has no slot after adoption"),
                })?;
            // Starting from an empty set would hand out addresses in use.
            let Some(used) = known.get_mut(host) else {
                drop(known);
                book.free(&allocated);
                return Err(IpamStoreError::BookChanged { host: *host });
            };
            let pair = match ipam.allocate_instance(host_prefixes, used) {
                Ok(pair) => pair,
                Err(error) => {
                    drop(known);
                    book.free(&allocated);
                    return Err(IpamStoreError::Allocation(error));
                }
            };
            used.insert(pair);
            allocated.push((*host, pair));
            existing.insert(*instance, pair);
            pairs.push(pair);
            new_ids.push(instance.as_uuid());
            new_hosts.push(host.as_uuid());
            new_v6.push(pair.ipv6.to_string());
            new_v4.push(pair.ipv4.to_string());
        }
    }

    if !new_ids.is_empty() {
        let stored = sqlx::query(
            "INSERT INTO ipam_instance_addresses (instance_id, env_id, host_id, ipv6, ipv4) \
             SELECT new.instance_id, $2, new.host_id, new.ipv6, new.ipv4 \
             FROM unnest($1::uuid[], $3::uuid[], $4::text[], $5::text[]) \
                  AS new(instance_id, host_id, ipv6, ipv4)",
        )
        .bind(&new_ids)
        .bind(env.as_uuid())
        .bind(&new_hosts)
        .bind(&new_v6)
        .bind(&new_v4)
        .execute(conn)
        .await;
        if let Err(error) = stored {
            book.free(&allocated);
            // A duplicate means the book was wrong about these hosts, and so may a deadlock
            // between two batches that took the same pair: read them again.
            if let sqlx::Error::Database(db) = &error
                && matches!(db.code().as_deref(), Some("23505" | "40P01"))
            {
                let hosts: Vec<HostId> = host_slots.keys().copied().collect();
                book.forget_hosts(&hosts);
            }
            return Err(query_failed("store the instances' addresses")(error));
        }
    }
    Ok(Placed { pairs, allocated })
}

/// Frees the addresses of instances that are gone.
pub async fn release_instances(
    conn: &mut PgConnection,
    instances: &[InstanceId],
) -> Result<(), IpamStoreError> {
    let ids: Vec<Uuid> = instances.iter().map(|id| id.as_uuid()).collect();
    sqlx::query("DELETE FROM ipam_instance_addresses WHERE instance_id = ANY($1)")
        .bind(&ids)
        .execute(conn)
        .await
        .map_err(query_failed("free the instances' addresses"))?;
    Ok(())
}

/// Frees an instance's addresses once the instance is gone; returns whether it had any. The
/// orchestrator frees in batches with [`release_instances`]; this single form is for tests.
#[cfg(test)]
async fn release_instance(
    conn: &mut PgConnection,
    instance: InstanceId,
) -> Result<bool, IpamStoreError> {
    let deleted = sqlx::query("DELETE FROM ipam_instance_addresses WHERE instance_id = $1")
        .bind(instance.as_uuid())
        .execute(conn)
        .await
        .map_err(query_failed("free the instance's addresses"))?;
    Ok(deleted.rows_affected() > 0)
}

fn parse_pair(ipv6: String, ipv4: String) -> Result<InstanceAddresses, IpamStoreError> {
    let v6: Ipv6Addr = ipv6.parse().map_err(|_| IpamStoreError::CorruptRow {
        column: "ipam_instance_addresses.ipv6",
        value: ipv6.clone(),
    })?;
    let v4: Ipv4Addr = ipv4.parse().map_err(|_| IpamStoreError::CorruptRow {
        column: "ipam_instance_addresses.ipv4",
        value: ipv4.clone(),
    })?;
    Ok(InstanceAddresses { ipv6: v6, ipv4: v4 })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use sqlx::postgres::PgPoolOptions;
    use sqlx::{PgPool, migrate::Migrator};

    use super::*;

    static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

    async fn pool() -> PgPool {
        let database = kiln_testkit::postgres::database().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&database.url)
            .await
            .unwrap();
        MIGRATOR.run(&pool).await.unwrap();
        pool
    }

    #[tokio::test]
    async fn bootstrap_keeps_first_prefix() {
        let pool = pool().await;
        let mut conn = pool.acquire().await.unwrap();
        let first = bootstrap(&mut conn, [1, 2, 3, 4, 5]).await.unwrap();
        let second = bootstrap(&mut conn, [9, 9, 9, 9, 9]).await.unwrap();
        assert_eq!(first.cluster().to_string(), "fd01:203:405::/48");
        assert_eq!(second, first);
    }

    #[tokio::test]
    async fn load_without_bootstrap_fails() {
        let pool = pool().await;
        let mut conn = pool.acquire().await.unwrap();
        assert!(matches!(
            load(&mut conn).await,
            Err(IpamStoreError::NoClusterPrefix)
        ));
    }

    #[tokio::test]
    async fn allocations_idempotent_and_reused() {
        let pool = pool().await;
        let mut tx = pool.begin().await.unwrap();
        let ipam = bootstrap(&mut tx, [1, 2, 3, 4, 5]).await.unwrap();
        let (env, host) = (EnvId::new(), HostId::new());
        let (a, b, c) = (InstanceId::new(), InstanceId::new(), InstanceId::new());

        let pair_a = instance_addresses(&mut tx, &ipam, env, host, a)
            .await
            .unwrap();
        let pair_b = instance_addresses(&mut tx, &ipam, env, host, b)
            .await
            .unwrap();
        assert_ne!(pair_a, pair_b);
        assert_eq!(
            instance_addresses(&mut tx, &ipam, env, host, a)
                .await
                .unwrap(),
            pair_a
        );

        assert!(release_instance(&mut tx, a).await.unwrap());
        assert!(!release_instance(&mut tx, a).await.unwrap());
        let pair_c = instance_addresses(&mut tx, &ipam, env, host, c)
            .await
            .unwrap();
        assert_eq!(pair_c, pair_a, "the freed pair is handed out again");
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn host_release_blocked_while_referenced() {
        let pool = pool().await;
        let mut tx = pool.begin().await.unwrap();
        let ipam = bootstrap(&mut tx, [1, 2, 3, 4, 5]).await.unwrap();
        let (env, host, instance) = (EnvId::new(), HostId::new(), InstanceId::new());
        instance_addresses(&mut tx, &ipam, env, host, instance)
            .await
            .unwrap();

        assert!(matches!(
            release_host(&mut tx, host).await,
            Err(IpamStoreError::HostStillReferenced { count: 1, .. })
        ));
        release_instance(&mut tx, instance).await.unwrap();
        assert!(release_host(&mut tx, host).await.unwrap());
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn host_addresses_exhaust() {
        let pool = pool().await;
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(
            "INSERT INTO ipam_cluster (prefix, host_ipv4_prefix_len) VALUES ('fd00:1:2::/48', 29)",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        let ipam = load(&mut conn).await.unwrap();
        let (env, host) = (EnvId::new(), HostId::new());

        for _ in 0..ipam.instances_per_host() {
            instance_addresses(&mut conn, &ipam, env, host, InstanceId::new())
                .await
                .unwrap();
        }
        let error = instance_addresses(&mut conn, &ipam, env, host, InstanceId::new())
            .await
            .unwrap_err();
        assert!(matches!(
            error,
            IpamStoreError::Allocation(IpamError::HostAddressesExhausted { .. })
        ));
    }

    #[tokio::test]
    async fn concurrent_allocations_never_collide() {
        let pool = pool().await;
        let ipam = {
            let mut conn = pool.acquire().await.unwrap();
            bootstrap(&mut conn, [7, 7, 7, 7, 7]).await.unwrap()
        };
        let hosts = [HostId::new(), HostId::new()];
        let env = EnvId::new();

        let tasks: Vec<_> = (0..40)
            .map(|n| {
                let pool = pool.clone();
                let host = hosts[n % 2];
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    let pair = instance_addresses(&mut tx, &ipam, env, host, InstanceId::new())
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    pair
                })
            })
            .collect();

        let mut seen_v6 = BTreeSet::new();
        let mut seen_v4 = BTreeSet::new();
        for task in tasks {
            let pair = task.await.unwrap();
            assert!(seen_v6.insert(pair.ipv6), "{} handed out twice", pair.ipv6);
            assert!(seen_v4.insert(pair.ipv4), "{} handed out twice", pair.ipv4);
        }
    }

    #[tokio::test]
    async fn concurrent_batches_share_the_book_without_collisions() {
        let pool = pool().await;
        let ipam = {
            let mut conn = pool.acquire().await.unwrap();
            bootstrap(&mut conn, [7, 7, 7, 7, 8]).await.unwrap()
        };
        let book = std::sync::Arc::new(AddressBook::default());
        let hosts = [(HostId::new(), 1), (HostId::new(), 2)];

        // Batches overlap in time and all place on both hosts; the shared lock lets them.
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (pool, book) = (pool.clone(), std::sync::Arc::clone(&book));
                tokio::spawn(async move {
                    let batch: Vec<_> = (0..6)
                        .map(|n| (hosts[n % 2].0, hosts[n % 2].1, InstanceId::new()))
                        .collect();
                    let mut tx = pool.begin().await.unwrap();
                    let placed = place_instances(&mut tx, &ipam, &book, EnvId::new(), &batch)
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                    tx.commit().await.unwrap();
                    placed.pairs
                })
            })
            .collect();

        let mut seen_v6 = BTreeSet::new();
        let mut seen_v4 = BTreeSet::new();
        for task in tasks {
            for pair in task.await.unwrap() {
                assert!(seen_v6.insert(pair.ipv6), "{} handed out twice", pair.ipv6);
                assert!(seen_v4.insert(pair.ipv4), "{} handed out twice", pair.ipv4);
            }
        }
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM ipam_instance_addresses")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(stored, 72);
    }

    #[tokio::test]
    async fn book_reads_existing_addresses_and_reuses_freed_ones() {
        let pool = pool().await;
        let mut tx = pool.begin().await.unwrap();
        let ipam = bootstrap(&mut tx, [1, 2, 3, 4, 6]).await.unwrap();
        let (env, host) = (EnvId::new(), HostId::new());

        // Placed before this book existed, as by an earlier leader.
        let earlier = InstanceId::new();
        adopt_host_slot(&mut tx, &ipam, host, 3).await.unwrap();
        let earlier_pair = instance_addresses(&mut tx, &ipam, env, host, earlier)
            .await
            .unwrap();

        let book = AddressBook::default();
        let (a, b) = (InstanceId::new(), InstanceId::new());
        let placed = place_instances(
            &mut tx,
            &ipam,
            &book,
            env,
            &[(host, 3, earlier), (host, 3, a), (host, 3, b)],
        )
        .await
        .unwrap();
        let pairs = placed.pairs;
        assert_eq!(placed.allocated, vec![(host, pairs[1]), (host, pairs[2])]);
        assert_eq!(
            pairs[0], earlier_pair,
            "a placed instance keeps its addresses"
        );
        assert!(!pairs[1..].contains(&earlier_pair));
        assert_ne!(pairs[1], pairs[2]);

        release_instances(&mut tx, &[a]).await.unwrap();
        book.free(&[(host, pairs[1])]);
        let c = InstanceId::new();
        let again = place_instances(&mut tx, &ipam, &book, env, &[(host, 3, c)])
            .await
            .unwrap()
            .pairs;
        assert_eq!(again[0], pairs[1], "the freed pair is handed out again");

        // A new book, as a new leader builds, reads the host from the table.
        let fresh_book = AddressBook::default();
        let d = InstanceId::new();
        let fresh = place_instances(&mut tx, &ipam, &fresh_book, env, &[(host, 3, d)])
            .await
            .unwrap()
            .pairs;
        assert!(![earlier_pair, pairs[2], again[0]].contains(&fresh[0]));
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn duplicate_frees_the_batch_and_rereads_its_hosts() {
        let pool = pool().await;
        let mut tx = pool.begin().await.unwrap();
        let ipam = bootstrap(&mut tx, [1, 2, 3, 4, 7]).await.unwrap();
        let (env, host) = (EnvId::new(), HostId::new());
        let book = AddressBook::default();
        let first = place_instances(&mut tx, &ipam, &book, env, &[(host, 4, InstanceId::new())])
            .await
            .unwrap();
        tx.commit().await.unwrap();

        // Another writer stores the next free pair behind the book's back.
        let stale_book = AddressBook::default();
        let mut tx = pool.begin().await.unwrap();
        place_instances(
            &mut tx,
            &ipam,
            &stale_book,
            env,
            &[(host, 4, InstanceId::new())],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let mut tx = pool.begin().await.unwrap();
        let collided =
            place_instances(&mut tx, &ipam, &book, env, &[(host, 4, InstanceId::new())]).await;
        assert!(
            matches!(collided, Err(IpamStoreError::Query { .. })),
            "{collided:?}"
        );
        tx.rollback().await.unwrap();

        let mut tx = pool.begin().await.unwrap();
        let retried = place_instances(&mut tx, &ipam, &book, env, &[(host, 4, InstanceId::new())])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM ipam_instance_addresses")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(stored, 3);
        assert_ne!(retried.pairs[0], first.pairs[0]);
    }
}
