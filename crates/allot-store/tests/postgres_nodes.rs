//! Several PostgreSQL stores over one database, as several nodes would be: contention between
//! their writers is decided by the database (no oversell, no deadlock, only the request
//! concerned refused), nodes with different clocks cannot both re-sell and confirm an expiring
//! hold, expiry on every node releases each hold once, the exclusion constraint guards
//! capacity-one resources on its own, and catalogue caches follow other nodes' changes.
//! The last tests pause a batch mid-way (on nodes of one write lane, a raw session holds an
//! uncommitted user whose email the batch's last request inserts too) to force the
//! interleavings a review found between nodes. The last one leads a node through
//! a relay that cuts the connection at a COMMIT, before or after the server gets it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot_app::access::{RoleGrant, RoleRevoke};
use allot_app::store::{
    Decide, HoldCommand, HoldRefused, IdempotencyBegin, IdempotencyKey, RefreshToken, Role, RotateOutcome, Store,
    UpdateRefused, User,
};
use allot_app::{AppError, StoreError};
use allot_core::booking::{Booking, BookingItem, Transition};
use allot_core::capacity::{Claim, Span};
use allot_core::ids::{ItemId, ResourceId, UserId, VenueId};
use allot_core::inventory::{Currency, Location, Resource, ResourceRules, Venue, VenuePolicies};
use allot_core::time_model::{FreeModel, TimeModel};
use allot_store::PgStore;
use allot_store::postgres::WRITE_LOCK_WAIT_MILLISECONDS_MAX;
use allot_store::testing::{drop_postgres_database, fresh_postgres_database};
use jiff::Timestamp;
use sqlx::{Connection, PgConnection};

/// 2026-11-23T08:00:00Z.
const T0: i64 = 1_795_420_800;
const HOUR: i64 = 3600;

fn at(offset: i64) -> Timestamp {
    Timestamp::from_second(T0 + offset).unwrap()
}

struct Cluster {
    url: String,
    nodes: Vec<Arc<PgStore>>,
    venue: Venue,
}

impl Cluster {
    /// `n` stores over one fresh database, or `None` when PostgreSQL is absent (outside CI).
    async fn start(n: usize) -> Option<Cluster> {
        Cluster::start_with_lanes(n, allot_store::postgres::WRITE_LANES).await
    }

    /// [`Cluster::start`] with nodes of `lanes` write lanes each.
    async fn start_with_lanes(n: usize, lanes: usize) -> Option<Cluster> {
        let url = fresh_postgres_database().await?;
        Some(Cluster::over(url.clone(), &vec![url; n], lanes).await)
    }

    /// A node per URL in `node_urls` (each reaching the fresh database `url`, with `lanes` write
    /// lanes) and a venue.
    async fn over(url: String, node_urls: &[String], lanes: usize) -> Cluster {
        let mut nodes = Vec::new();
        for node_url in node_urls {
            nodes.push(Arc::new(PgStore::open_with_lanes(node_url, lanes).await.unwrap()));
        }
        let venue = Venue {
            id: VenueId::new(),
            name: "Nodes".into(),
            category: "studio".into(),
            location: Location { lat: 0.0, lon: 0.0 },
            address: "Loopback 1".into(),
            timezone: "UTC".into(),
            currency: Currency::try_from("EUR".to_owned()).unwrap(),
            rating: 4.0,
            amenities: vec![],
            policies: VenuePolicies::default(),
            managers: vec![],
        };
        nodes[0].insert_venue(&venue).await.unwrap();
        Cluster { url, nodes, venue }
    }

    async fn resource(&self, capacity: u32) -> Resource {
        let r = Resource {
            id: ResourceId::new(),
            venue_id: self.venue.id,
            name: "Room".into(),
            capacity,
            unit_price: 100,
            attributes: "{}".into(),
            price_category: None,
            time_model: TimeModel::Free(FreeModel {
                step_minutes: 1,
                min_minutes: 1,
                max_minutes: 1440,
                schedule: None,
            }),
            rules: ResourceRules::default(),
        };
        self.nodes[0].insert_resource(&r).await.unwrap();
        r
    }

    fn hold_command(&self, wants: &[(ResourceId, Span)], now: Timestamp, ttl: i64) -> HoldCommand {
        let items = wants
            .iter()
            .map(|&(resource_id, span)| BookingItem {
                id: ItemId::new(),
                resource_id,
                event_id: None,
                start: Timestamp::from_second(span.start).unwrap(),
                end: Timestamp::from_second(span.end).unwrap(),
                quantity: 1,
                unit_price: 100,
                price: 100,
            })
            .collect();
        let expires = Timestamp::from_second(now.as_second() + ttl).unwrap();
        let booking = Booking::new_hold(UserId::new(), self.venue.id, self.venue.currency, items, now, expires);
        let claims = wants.iter().map(|&(_, span)| Claim { span, quantity: 1 }).collect();
        HoldCommand { booking, claims, now }
    }

    async fn finish(self) {
        let url = self.url.clone();
        drop(self);
        drop_postgres_database(&url).await;
    }
}

fn confirm() -> Decide {
    Box::new(|b: &Booking, now| {
        let mut next = b.clone();
        next.status = b.next_status(Transition::Confirm, now).map_err(|_| AppError::HoldExpired)?;
        next.expires_at = None;
        Ok(next)
    })
}

fn morning() -> Span {
    Span::new(T0 + 2 * HOUR, T0 + 3 * HOUR)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_contending_for_the_same_resources_never_oversell_nor_deadlock() {
    let Some(cluster) = Cluster::start(3).await else { return };
    let seat = cluster.resource(1).await;
    let room = cluster.resource(5).await;
    let (a, b) = (cluster.resource(1).await, cluster.resource(1).await);
    let cluster = Arc::new(cluster);
    let mut tasks = Vec::new();
    for i in 0..120_usize {
        let cluster = cluster.clone();
        let node = cluster.nodes[i % 3].clone();
        // Four kinds of request, interleaved: one seat, one of five rooms, and two resources
        // taken together in opposite orders (what would deadlock with per-request locking).
        let wants = match i % 4 {
            0 => vec![(seat.id, morning())],
            1 => vec![(room.id, morning())],
            2 => vec![(a.id, morning()), (b.id, morning())],
            _ => vec![(b.id, morning()), (a.id, morning())],
        };
        tasks.push(tokio::spawn(async move { (i % 4, node.hold(cluster.hold_command(&wants, at(0), 600)).await) }));
    }
    let mut won = [0_usize; 4];
    for task in tasks {
        let (kind, outcome) = task.await.unwrap();
        match outcome {
            Ok(_) => won[kind] += 1,
            Err(HoldRefused::Unavailable { .. }) => {}
            Err(other) => panic!("a hold failed with something other than 409 unavailable: {other:?}"),
        }
    }
    assert_eq!(won[0], 1, "one seat, one winner");
    assert_eq!(won[1], 5, "five rooms, five winners");
    assert_eq!(won[2] + won[3], 1, "the pair is won once, whichever order it was asked in");
    let cluster = Arc::into_inner(cluster).unwrap();
    for (resource, capacity) in [(seat.id, 1), (room.id, 5), (a.id, 1), (b.id, 1)] {
        let claims = cluster.nodes[1].claims(resource, morning(), at(0)).await.unwrap();
        // Claims of one block may come summed: count units, not rows.
        assert_eq!(claims.iter().map(|c| c.quantity).sum::<u32>(), capacity, "units claimed on {resource}");
    }
    cluster.finish().await;
}

/// One node's write lanes (`WRITE_LANES` connections, each with its own batches) are to each
/// other what nodes are: bookings over two resources of different lanes, taken at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nodes_write_lanes_never_oversell_resources_they_share() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let mut resources = Vec::new();
    for _ in 0..12 {
        resources.push(cluster.resource(1).await.id);
    }
    let cluster = Arc::new(cluster);
    let mut tasks = Vec::new();
    for i in 0..240_usize {
        let cluster = cluster.clone();
        let (first, second) = (resources[i % 12], resources[(i * 7 + 5) % 12]);
        let wants =
            if first == second { vec![(first, morning())] } else { vec![(first, morning()), (second, morning())] };
        tasks.push(tokio::spawn(async move {
            let outcome = cluster.nodes[0].hold(cluster.hold_command(&wants, at(0), 600)).await;
            (wants, outcome)
        }));
    }
    let mut held = std::collections::HashMap::new();
    for task in tasks {
        let (wants, outcome) = task.await.unwrap();
        match outcome {
            Ok(booking) => {
                for (resource, _) in wants {
                    assert!(held.insert(resource, booking.id).is_none(), "{resource} held twice");
                }
            }
            Err(HoldRefused::Unavailable { .. }) => {}
            Err(other) => panic!("a hold failed with something other than 409 unavailable: {other:?}"),
        }
    }
    assert!(!held.is_empty());
    let cluster = Arc::into_inner(cluster).unwrap();
    for resource in resources {
        let claims = cluster.nodes[0].claims(resource, morning(), at(0)).await.unwrap();
        let units = claims.iter().map(|c| c.quantity).sum::<u32>();
        assert_eq!(units, u32::from(held.contains_key(&resource)), "units claimed on {resource}");
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_slow_clock_cannot_confirm_a_hold_a_faster_node_already_resold() {
    let Some(cluster) = Cluster::start(2).await else { return };
    let (fast, slow) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    // Two rooms, one taken for good: the hold below is on the last one.
    let rooms = cluster.resource(2).await;
    let ttl = 600;
    let taken = fast.hold(cluster.hold_command(&[(rooms.id, morning())], at(0), 3 * ttl)).await.unwrap();
    fast.update_booking(taken.id, at(1), confirm()).await.unwrap();
    let first = slow.hold(cluster.hold_command(&[(rooms.id, morning())], at(2), ttl)).await.unwrap();
    // The fast node's clock says the hold has lapsed: it sells the last room again.
    let resold = fast.hold(cluster.hold_command(&[(rooms.id, morning())], at(ttl + 3), ttl)).await.unwrap();
    // The slow node still believes the first hold has a few seconds left. Deciding on the
    // rooms after the fast node did, it must see at least the fast node's time.
    let late = slow.update_booking(first.id, at(ttl - 5), confirm()).await;
    assert!(
        matches!(late, Err(UpdateRefused::Rejected(AppError::HoldExpired))),
        "the slow node confirmed a hold whose room was resold: {late:?}"
    );
    let live = fast.claims(rooms.id, morning(), at(ttl + 3)).await.unwrap();
    assert_eq!(live.iter().map(|c| c.quantity).sum::<u32>(), 2, "two rooms claimed");
    assert_eq!(fast.booking(resold.id).await.unwrap().unwrap().status.as_str(), "held");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sweeping_expiry_releases_each_hold_once() {
    let Some(cluster) = Cluster::start(3).await else { return };
    let mut held = Vec::new();
    for i in 0..30 {
        let r = cluster.resource(1).await;
        let node = &cluster.nodes[i % 3];
        held.push(node.hold(cluster.hold_command(&[(r.id, morning())], at(0), 60)).await.unwrap().id);
    }
    let sweeps: Vec<_> = (0..3)
        .flat_map(|round| cluster.nodes.iter().map(move |n| (round, n.clone())))
        .map(|(round, node)| tokio::spawn(async move { node.expire_due(at(61 + round), 7).await.unwrap().len() }))
        .collect();
    let mut released = 0;
    for sweep in sweeps {
        released += sweep.await.unwrap();
    }
    // Nine sweeps of at most seven: whatever is left, one more pass per node finishes it.
    for node in &cluster.nodes {
        released += node.expire_due(at(70), 100).await.unwrap().len();
    }
    assert_eq!(released, 30, "each hold released exactly once across nodes");
    let node = &cluster.nodes[0];
    assert_eq!(node.count("bookings", "status = 'expired'").await.unwrap(), 30);
    assert_eq!(node.count("outbox", "topic = 'booking.expired'").await.unwrap(), 30, "one event per expiry");
    assert_eq!(node.count("claims", "true").await.unwrap(), 0, "all capacity released");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exclusion_constraint_refuses_overlapping_capacity_one_claims_by_itself() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let seat = cluster.resource(1).await;
    let held = cluster.nodes[0].hold(cluster.hold_command(&[(seat.id, morning())], at(0), 600)).await.unwrap();
    // Bypass the engine: a second overlapping claim written straight into the table.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url).await.unwrap();
    let sneaked = sqlx::query(
        "INSERT INTO claims (item_id, booking_id, resource_id, venue_id, block_start, block_end, quantity, exclusive)
         VALUES ('sneaked', $1, $2, $3, $4, $5, 1, true)",
    )
    .bind(held.id.to_string())
    .bind(seat.id.to_string())
    .bind(cluster.venue.id.to_string())
    .bind(morning().start + 60)
    .bind(morning().end + 60)
    .execute(&mut conn)
    .await;
    let code = sneaked.unwrap_err().as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("23P01"), "exclusion_violation");
    drop(conn);
    // A lapsed hold does not block the seat, even before the sweep has released it.
    let after = cluster.nodes[0].hold(cluster.hold_command(&[(seat.id, morning())], at(601), 600)).await;
    assert!(after.is_ok(), "the lapsed hold still blocks the seat: {after:?}");
    assert_eq!(cluster.nodes[0].expire_due(at(601), 10).await.unwrap(), vec![held.id]);
    assert_eq!(cluster.nodes[0].booking(held.id).await.unwrap().unwrap().status.as_str(), "expired");
    assert_eq!(cluster.nodes[0].count("outbox", "topic = 'booking.expired'").await.unwrap(), 1);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_exclusion_constraint_refuses_refuses_only_its_own_hold() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let node = cluster.nodes[0].clone();
    let (seat, aisle, other) = (cluster.resource(1).await, cluster.resource(1).await, cluster.resource(1).await);
    node.hold(cluster.hold_command(&[(seat.id, morning())], at(0), 600)).await.unwrap();
    // Blind the engine: without its totals row the seat's claim is invisible to the capacity
    // rule, so only the exclusion constraint still knows the seat is taken.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url).await.unwrap();
    sqlx::query("DELETE FROM claim_totals WHERE resource_id = $1")
        .bind(seat.id.to_string())
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let both = cluster.hold_command(&[(aisle.id, morning()), (seat.id, morning())], at(1), 600);
    let alone = cluster.hold_command(&[(other.id, morning())], at(1), 600);
    let (refused, kept) = tokio::join!(node.hold(both), node.hold(alone));
    assert!(matches!(refused, Err(HoldRefused::Unavailable { item_index: 1, .. })), "{refused:?}");
    assert!(kept.is_ok(), "{kept:?}");
    assert_eq!(node.count("bookings", "true").await.unwrap(), 2, "the refused booking is not stored");
    assert_eq!(node.count("claims", "true").await.unwrap(), 2, "nor its claim on the aisle");
    assert_eq!(node.count("outbox", "topic = 'booking.held'").await.unwrap(), 2, "nor its event");
    node.hold(cluster.hold_command(&[(aisle.id, morning())], at(2), 600)).await.expect("the aisle is free");
    cluster.finish().await;
}

/// A node's cached copy may be older than another node's acknowledged change; an edit made
/// from it is refused (`Changed`) rather than written over that change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_from_a_stale_copy_is_refused() {
    let Some(cluster) = Cluster::start(2).await else { return };
    let (first, second) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let room = cluster.resource(3).await;
    let stale = second.resource(room.id).await.unwrap().unwrap();
    let mut closed = room.clone();
    closed.capacity = 0;
    first.update_resource(&room, &closed).await.unwrap();
    let mut renamed = (*stale).clone();
    renamed.name = "Renamed".into();
    match second.update_resource(&stale, &renamed).await {
        Err(StoreError::Changed("resource")) => {}
        other => panic!("an edit of a stale copy: expected Changed, got {other:?}"),
    }
    assert_eq!(first.resource(room.id).await.unwrap().unwrap().capacity, 0, "the closure stands");
    let fresh = second.resource(room.id).await.unwrap().unwrap();
    assert_eq!(fresh.capacity, 0, "the refusal dropped the stale copy");
    let mut renamed = (*fresh).clone();
    renamed.name = "Renamed".into();
    second.update_resource(&fresh, &renamed).await.unwrap();
    assert_eq!(first.resource(room.id).await.unwrap().unwrap().capacity, 0);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_changes_reach_other_nodes_within_a_second() {
    let Some(cluster) = Cluster::start(2).await else { return };
    let (writer, reader) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let mut room = cluster.resource(3).await;
    // The reader caches the room and the venue.
    assert_eq!(reader.resource(room.id).await.unwrap().unwrap().capacity, 3);
    assert_eq!(reader.venue(cluster.venue.id).await.unwrap().unwrap().name, "Nodes");
    let before = room.clone();
    room.capacity = 7;
    writer.update_resource(&before, &room).await.unwrap();
    let mut venue = cluster.venue.clone();
    venue.name = "Renamed".into();
    writer.update_venue(&cluster.venue, &venue).await.unwrap();
    let started = Instant::now();
    loop {
        let seen = reader.resource(room.id).await.unwrap().unwrap().capacity;
        let name = reader.venue(venue.id).await.unwrap().unwrap().name.clone();
        if seen == 7 && name == "Renamed" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "still {seen} / {name} after a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reader.resources_by_ids(&[room.id]).await.unwrap()[0].capacity, 7);
    writer.delete_resource(room.id, at(0)).await.unwrap();
    let started = Instant::now();
    while reader.resource(room.id).await.unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(1), "deleted resource still served after a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reader.resources_by_ids(&[room.id]).await.unwrap().is_empty());
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_changes_reach_other_nodes_within_a_second() {
    let Some(cluster) = Cluster::start(2).await else { return };
    let (writer, reader) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    writer.insert_user(&admin("staying@example.test")).await.unwrap();
    let mut user = admin("changing@example.test");
    user.roles = vec![Role::Customer];
    writer.insert_user(&user).await.unwrap();
    let seen = |reader: Arc<PgStore>| async move { reader.user_by_id(user.id).await.unwrap().unwrap() };
    // The reader caches the user (every request reads its principal).
    assert_eq!(seen(reader.clone()).await.roles, vec![Role::Customer]);
    writer.grant_role(user.id, RoleGrant::Admin).await.unwrap();
    let started = Instant::now();
    while !seen(reader.clone()).await.roles.contains(&Role::Admin) {
        assert!(started.elapsed() < Duration::from_secs(1), "the granted role unseen after a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.set_manager(cluster.venue.id, user.id).await.unwrap();
    let started = Instant::now();
    while !seen(reader.clone()).await.venues.contains(&cluster.venue.id) {
        assert!(started.elapsed() < Duration::from_secs(1), "the managed venue unseen after a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.revoke_role(user.id, RoleRevoke::Admin).await.unwrap();
    let started = Instant::now();
    while seen(reader.clone()).await.roles.contains(&Role::Admin) {
        assert!(started.elapsed() < Duration::from_secs(1), "a revoked admin still an admin after a second");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.finish().await;
}

/// Kills every server connection of the test database, as a PostgreSQL restart or a network
/// cut would.
async fn kill_connections(url: &str) {
    let name = url.rsplit('/').next().unwrap().to_owned();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&allot_store::testing::test_server_url()).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(killed.len() >= 2, "the writer and the listener at least: {killed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_recovers_when_its_database_connections_are_killed() {
    let Some(cluster) = Cluster::start(2).await else { return };
    let (writer, reader) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let mut room = cluster.resource(2).await;
    assert_eq!(reader.resource(room.id).await.unwrap().unwrap().capacity, 2);
    kill_connections(&cluster.url).await;
    // Writes work again after at most a failed attempt or two (the write connection is
    // replaced when a batch cannot begin), and nothing half-done is left behind.
    let started = Instant::now();
    let held = loop {
        match writer.hold(cluster.hold_command(&[(room.id, morning())], at(0), 600)).await {
            Ok(b) => break b,
            Err(HoldRefused::Store(e)) => {
                assert!(started.elapsed() < Duration::from_secs(10), "writes still failing: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("unexpected refusal: {other:?}"),
        }
    };
    assert_eq!(reader.claims(room.id, morning(), at(0)).await.unwrap().iter().map(|c| c.quantity).sum::<u32>(), 1);
    assert_eq!(reader.booking(held.id).await.unwrap().unwrap().id, held.id);
    // The reader's listener reconnects too: a document cached after the cut is still dropped
    // when another node changes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reader.resource(room.id).await.unwrap().unwrap().capacity, 2);
    let before = room.clone();
    room.capacity = 9;
    writer.update_resource(&before, &room).await.unwrap();
    let started = Instant::now();
    while reader.resource(room.id).await.unwrap().unwrap().capacity != 9 {
        assert!(started.elapsed() < Duration::from_secs(3), "the reader's cache missed a change after reconnecting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_apply_the_migrations_once() {
    let Some(url) = fresh_postgres_database().await else { return };
    let opening: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::open(&url).await.map(|_| ()) })
        })
        .collect();
    for open in opening {
        open.await.unwrap().unwrap();
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations").fetch_one(&mut conn).await.unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres")).unwrap().count();
    assert_eq!(usize::try_from(applied).unwrap(), files, "each migration applied once");
    drop(conn);
    drop_postgres_database(&url).await;
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey { principal: "review".into(), key: k.into(), request_hash: "h".into(), owner: "node".into() }
}

/// A raw session holding an uncommitted user whose email [`pause`] inserts too: that insert
/// waits on it, mid-batch, until [`release`] (rollback), then goes ahead. On a node of one write
/// lane, requests queued together run in one batch in their order, so a test can pause a batch
/// right after the requests queued before its [`pause`].
async fn blocker(url: &str, tag: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, roles, created_at) VALUES ($1, $2, 'Pause', 'x', '', 0)",
    )
    .bind(format!("blocker-{tag}"))
    .bind(pause_email(tag))
    .execute(&mut conn)
    .await
    .unwrap();
    conn
}

fn pause_email(tag: &str) -> String {
    format!("pause-{tag}@example.test")
}

/// A request that waits on [`blocker`] `tag` in its batch.
async fn pause(node: &PgStore, tag: &str) -> Result<(), StoreError> {
    let user = User { email: pause_email(tag), roles: vec![Role::Customer], ..admin("pause@example.test") };
    node.insert_user(&user).await
}

async fn release(mut conn: PgConnection) {
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
}

/// Two cinema customers each held two seats and walked away. On two nodes, other customers
/// take those seats crosswise, two holds per batch, both batches open at once. A hold steps
/// over lapsed claims only on the seat it has locked: were it to expire the abandoned booking
/// (and delete its claim on the other seat, locked by the other node), each node's batch would
/// wait on the other's transaction, a deadlock that fails ordinary holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_over_lapsed_claims_on_two_nodes_do_not_deadlock() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, c) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let s: Vec<Resource> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(cluster.resource(1).await);
        }
        v
    };
    // B holds S1+S2, D holds S3+S4; both lapse at +60.
    a.hold(cluster.hold_command(&[(s[0].id, morning()), (s[1].id, morning())], at(0), 60)).await.unwrap();
    a.hold(cluster.hold_command(&[(s[2].id, morning()), (s[3].id, morning())], at(0), 60)).await.unwrap();

    // Pause both writers so that the next three requests of each land in one batch.
    let x0a = blocker(&cluster.url, "a0").await;
    let x0c = blocker(&cluster.url, "c0").await;
    let x1a = blocker(&cluster.url, "a1").await;
    let x1c = blocker(&cluster.url, "c1").await;
    let p0a = tokio::spawn({
        let a = a.clone();
        async move { pause(&a, "a0").await }
    });
    let p0c = tokio::spawn({
        let c = c.clone();
        async move { pause(&c, "c0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let now = at(61);
    let (h1a, h2a) = (
        cluster.hold_command(&[(s[0].id, morning())], now, 600),
        cluster.hold_command(&[(s[2].id, morning())], now, 600),
    );
    let (h1c, h2c) = (
        cluster.hold_command(&[(s[3].id, morning())], now, 600),
        cluster.hold_command(&[(s[1].id, morning())], now, 600),
    );
    // join! polls in order: each future queues its request on its first poll.
    let batch_a = tokio::spawn({
        let a = a.clone();
        async move { tokio::join!(a.hold(h1a), pause(&a, "a1"), a.hold(h2a)) }
    });
    let batch_c = tokio::spawn({
        let c = c.clone();
        async move { tokio::join!(c.hold(h1c), pause(&c, "c1"), c.hold(h2c)) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Batch 0 of each node ends; batch 1 decides its two holds together (where the first one
    // stood), then waits at its pause with its transaction open: both nodes' at once.
    release(x0a).await;
    release(x0c).await;
    p0a.await.unwrap().unwrap();
    p0c.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both batches have held over the abandoned bookings' lapsed claims; now let them commit.
    release(x1a).await;
    release(x1c).await;
    let (r1a, _, r2a) = batch_a.await.unwrap();
    let (r1c, _, r2c) = batch_c.await.unwrap();
    for r in [&r1a, &r1c, &r2a, &r2c] {
        assert!(r.is_ok(), "a hold on a seat whose only claim had lapsed failed: {r:?}");
    }
    // The abandoned bookings are still released by the sweep, once.
    assert_eq!(a.expire_due(at(62), 100).await.unwrap().len() + c.expire_due(at(62), 100).await.unwrap().len(), 2);
    cluster.finish().await;
}

/// Logout on one node while another node rotates the same refresh token: were the logout's
/// UPDATE to wait for the rotation's row lock and then re-check only the rows its snapshot
/// saw, the freshly issued successor (inserted by the rotation) would stay valid. The logout
/// waits, commits after the rotation, and the successor is revoked with its family.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logout_during_a_concurrent_rotation_revokes_the_successor_too() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, b) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let user = UserId::new();
    let t = RefreshToken { token_hash: "t0".into(), user_id: user, family_id: "fam".into(), expires_at: at(86_400) };
    a.insert_refresh_token(&t).await.unwrap();

    // Node A: a batch [rotate t0 -> t1, (paused request)] keeps its transaction open after
    // the rotation ran.
    let x0 = blocker(&cluster.url, "r0").await;
    let x1 = blocker(&cluster.url, "r1").await;
    let p0 = tokio::spawn({
        let a = a.clone();
        async move { pause(&a, "r0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rotating = tokio::spawn({
        let a = a.clone();
        async move { tokio::join!(a.rotate_refresh_token("t0", "t1", at(86_400), at(1)), pause(&a, "r1")) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x0).await;
    p0.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node B: logout with t0 while A's rotation is uncommitted; it waits on t0's row lock.
    let logout = tokio::spawn({
        let b = b.clone();
        async move { b.revoke_refresh_token("t0", at(2)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!logout.is_finished(), "the logout waits for the paused rotation");
    release(x1).await;
    let (rotated, _) = rotating.await.unwrap();
    assert!(matches!(rotated, Ok(RotateOutcome::Rotated { .. })), "{rotated:?}");
    logout.await.unwrap().unwrap();
    // The logout committed after the rotation: the whole family, t1 included, must be revoked.
    let again = b.rotate_refresh_token("t1", "t2", at(86_400), at(3)).await.unwrap();
    assert!(
        !matches!(again, RotateOutcome::Rotated { .. }),
        "the successor of a logged-out token still rotates after logout: {again:?}"
    );
    cluster.finish().await;
}

/// The same race through another token of the family: a logout with an older, already
/// rotated token, and a rotated token presented again (a stolen copy, which ends the family),
/// each on one node while the other rotates the family's live token. They lock different
/// rows, so only a lock on the family makes the revocation see the successor the rotation
/// inserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_family_through_an_older_token_catches_a_concurrent_rotation() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, b) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    for (family, revoke_by_reuse) in [("fam-logout", false), ("fam-reuse", true)] {
        let t = |n: u32| format!("{family}-t{n}");
        let first =
            RefreshToken { token_hash: t(0), user_id: UserId::new(), family_id: family.into(), expires_at: at(86_400) };
        a.insert_refresh_token(&first).await.unwrap();
        assert!(matches!(
            a.rotate_refresh_token(&t(0), &t(1), at(86_400), at(1)).await,
            Ok(RotateOutcome::Rotated { .. })
        ));

        // Node A: a batch [rotate t1 -> t2, (paused request)] keeps its transaction open.
        let (x0, x1) =
            (blocker(&cluster.url, &format!("{family}-0")).await, blocker(&cluster.url, &format!("{family}-1")).await);
        let p0 = tokio::spawn({
            let (a, tag) = (a.clone(), format!("{family}-0"));
            async move { pause(&a, &tag).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rotating = tokio::spawn({
            let (a, old, new, tag) = (a.clone(), t(1), t(2), format!("{family}-1"));
            async move { tokio::join!(a.rotate_refresh_token(&old, &new, at(86_400), at(2)), pause(&a, &tag)) }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        release(x0).await;
        p0.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Node B: the family revoked through t0 while A's rotation is uncommitted.
        let revoking = tokio::spawn({
            let (b, t0, tx) = (b.clone(), t(0), t(9));
            async move {
                if revoke_by_reuse {
                    let reused = b.rotate_refresh_token(&t0, &tx, at(86_400), at(3)).await?;
                    assert_eq!(reused, RotateOutcome::Reused);
                    Ok(())
                } else {
                    b.revoke_refresh_token(&t0, at(3)).await
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        release(x1).await;
        let (rotated, _) = rotating.await.unwrap();
        assert!(matches!(rotated, Ok(RotateOutcome::Rotated { .. })), "{rotated:?}");
        revoking.await.unwrap().unwrap();
        let again = b.rotate_refresh_token(&t(2), &t(3), at(86_400), at(4)).await.unwrap();
        assert_eq!(again, RotateOutcome::Invalid, "{family}: the rotation's successor outlived its family");
    }
    cluster.finish().await;
}

fn admin(email: &str) -> User {
    User {
        id: UserId::new(),
        email: email.into(),
        name: "Admin".into(),
        password_hash: "x".into(),
        roles: vec![Role::Admin],
        venues: vec![],
        created_at: at(0),
    }
}

/// The last two admins revoke each other's admin role on two nodes at once. Node A's batch has
/// demoted X and is paused, uncommitted; node B's revocation of Y waits on the admins' row
/// locks, then finds Y the only admin and refuses: never zero admins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admins_revoking_each_other_on_two_nodes_leave_one() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, b) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let (x, y) = (admin("x@example.test"), admin("y@example.test"));
    a.insert_user(&x).await.unwrap();
    a.insert_user(&y).await.unwrap();

    let x0 = blocker(&cluster.url, "a0").await;
    let x1 = blocker(&cluster.url, "a1").await;
    let p0 = tokio::spawn({
        let a = a.clone();
        async move { pause(&a, "a0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node A's next batch: [revoke X's admin role, (paused request)].
    let revoking = tokio::spawn({
        let a = a.clone();
        async move { tokio::join!(a.revoke_role(x.id, RoleRevoke::Admin), pause(&a, "a1")) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x0).await;
    p0.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = tokio::spawn({
        let b = b.clone();
        async move { b.revoke_role(y.id, RoleRevoke::Admin).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!other.is_finished(), "the revocation waits for the paused one");
    release(x1).await;
    let (demoted, _) = revoking.await.unwrap();
    assert_eq!(demoted.unwrap().roles, Vec::<Role>::new(), "X is no admin any more");
    let refused = other.await.unwrap();
    assert!(matches!(refused, Err(StoreError::Conflict(_))), "Y was the last admin: {refused:?}");
    assert_eq!(b.user_by_id(y.id).await.unwrap().unwrap().roles, vec![Role::Admin]);
    cluster.finish().await;
}

/// A session that holds one resource's lock and stops (a node frozen mid-batch): another node's
/// batch waits on it only [`WRITE_LOCK_WAIT_MILLISECONDS_MAX`] and then fails as busy (503,
/// retry), so that node's later writes, on any resource or none, go ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_lock_holder_delays_another_node_only_for_a_bounded_time() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let node = cluster.nodes[0].clone();
    let (hot, other) = (cluster.resource(1).await, cluster.resource(1).await);
    let mut stuck = PgConnection::connect(&cluster.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut stuck).await.unwrap();
    sqlx::query("SELECT 1 FROM resource_clocks WHERE resource_id = $1 FOR UPDATE")
        .bind(hot.id.to_string())
        .execute(&mut stuck)
        .await
        .unwrap();
    let first = tokio::spawn({
        let (node, cmd) = (node.clone(), cluster.hold_command(&[(hot.id, morning())], at(0), 600));
        async move { node.hold(cmd).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bound = Duration::from_millis(WRITE_LOCK_WAIT_MILLISECONDS_MAX) + Duration::from_secs(3);
    let unrelated =
        tokio::time::timeout(bound, node.hold(cluster.hold_command(&[(other.id, morning())], at(0), 600))).await;
    let no_keys = tokio::time::timeout(Duration::from_secs(1), node.idempotency_begin(&key("z"), at(0), 30)).await;
    let first = first.await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut stuck).await.unwrap();
    assert!(matches!(unrelated, Ok(Ok(_))), "a hold on another resource: {unrelated:?}");
    assert!(matches!(no_keys, Ok(Ok(_))), "a write with no resource: {no_keys:?}");
    assert!(matches!(first, Err(HoldRefused::Store(StoreError::Busy(_)))), "the blocked hold: {first:?}");
    // Once the holder is gone the resource is writable again.
    node.hold(cluster.hold_command(&[(hot.id, morning())], at(1), 600)).await.unwrap();
    cluster.finish().await;
}

/// Where [`CommitCutter`] cuts a connection at its next `COMMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The server gets the COMMIT and commits; its answer is lost with the connection.
    AnswerLost,
    /// The COMMIT is lost with the connection: the server sees the client go.
    CommitLost,
    /// The COMMIT is lost and the server does not notice (a network partition): its session
    /// stays idle inside the transaction.
    CommitLostUnnoticed,
}

/// `COMMIT` as a simple-protocol query message: 'Q', its length (4 + 7), the text.
const COMMIT_MESSAGE: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

/// A TCP relay between the nodes and PostgreSQL that, once armed, cuts the connection that
/// sends the next `COMMIT`, as a network or a proxy can.
struct CommitCutter {
    port: u16,
    armed: Arc<std::sync::Mutex<Option<Cut>>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    /// Server sides of [`Cut::CommitLostUnnoticed`] connections, held open (never read).
    _stalled: Arc<std::sync::Mutex<Vec<tokio::net::tcp::OwnedWriteHalf>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CommitCutter {
    async fn start(upstream: String) -> CommitCutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(std::sync::Mutex::new(None));
        let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stalled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, c, s) = (armed.clone(), cuts.clone(), stalled.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(relay(client, server, a.clone(), c.clone(), s.clone()));
            }
        });
        CommitCutter { port, armed, cuts, _stalled: stalled, accept }
    }

    fn arm(&self, cut: Cut) {
        *self.armed.lock().unwrap() = Some(cut);
    }

    fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays one connection both ways until either side closes, or until the armed cut.
async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    armed: Arc<std::sync::Mutex<Option<Cut>>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    stalled: Arc<std::sync::Mutex<Vec<tokio::net::tcp::OwnedWriteHalf>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers = tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
    let mut buf = vec![0_u8; 64 * 1024];
    // The end of the previous read, so a COMMIT split across two reads is still seen.
    let mut seen: Vec<u8> = Vec::new();
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen.extend_from_slice(&buf[..n]);
        let commit = seen.windows(COMMIT_MESSAGE.len()).any(|w| w == COMMIT_MESSAGE);
        if let Some(cut) = commit.then(|| armed.lock().unwrap().take()).flatten() {
            // No answer reaches the client from here on.
            answers.abort();
            let _ = answers.await;
            if cut == Cut::AnswerLost {
                server_write.write_all(&buf[..n]).await.unwrap();
            }
            cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if cut == Cut::CommitLostUnnoticed {
                // Dropping the write half would send the server an end of stream.
                stalled.lock().unwrap().push(server_write);
            }
            return;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let keep = seen.len().saturating_sub(COMMIT_MESSAGE.len() - 1);
        seen.drain(..keep);
    }
    answers.abort();
}

/// The server's `host:port` in `url`, and `url` led through a relay on `port` instead, with TLS
/// off (the relay reads the messages).
fn through_relay(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (user, host) = authority.rsplit_once('@').map_or(("", authority), |(u, h)| (u, h));
    let upstream = if host.contains(':') { host.to_owned() } else { format!("{host}:5432") };
    let user = if user.is_empty() { String::new() } else { format!("{user}@") };
    let sep = if path.contains('?') { '&' } else { '?' };
    (upstream, format!("{scheme}://{user}127.0.0.1:{port}/{path}{sep}sslmode=disable"))
}

/// One node whose every connection passes through a [`CommitCutter`].
async fn cluster_behind_a_cutter() -> Option<(Cluster, CommitCutter)> {
    let url = fresh_postgres_database().await?;
    let (upstream, _) = through_relay(&url, 0);
    let cutter = CommitCutter::start(upstream).await;
    let (_, node_url) = through_relay(&url, cutter.port);
    Some((Cluster::over(url, &[node_url], allot_store::postgres::WRITE_LANES).await, cutter))
}

/// A batch whose COMMIT's answer is lost is answered as the database decided it: kept when it
/// committed (a 5xx would have the client retry a hold that already holds the seat), failed
/// when it did not. A session left inside the lost transaction is ended, not left holding the
/// batch's locks until the server's idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_answer_is_lost_is_answered_as_the_database_decided_it() {
    let Some((cluster, cutter)) = cluster_behind_a_cutter().await else { return };
    let node = cluster.nodes[0].clone();
    let seat = cluster.resource(1).await;
    cutter.arm(Cut::AnswerLost);
    let held = node.hold(cluster.hold_command(&[(seat.id, morning())], at(0), 600)).await.expect("it committed");
    assert_eq!(cutter.cuts(), 1, "the COMMIT was cut");
    assert_eq!(node.booking(held.id).await.unwrap().unwrap().id, held.id);
    let again = node.hold(cluster.hold_command(&[(seat.id, morning())], at(1), 600)).await;
    assert!(matches!(again, Err(HoldRefused::Unavailable { .. })), "the seat is held once: {again:?}");
    // A request that is not a hold (a confirm) takes the same way.
    cutter.arm(Cut::AnswerLost);
    let confirmed = node.update_booking(held.id, at(2), confirm()).await.expect("it committed");
    assert_eq!(cutter.cuts(), 2);
    assert_eq!(confirmed.status, allot_core::booking::BookingStatus::Confirmed);
    for cut in [Cut::CommitLost, Cut::CommitLostUnnoticed] {
        let room = cluster.resource(1).await;
        let cuts = cutter.cuts();
        cutter.arm(cut);
        let lost = node.hold(cluster.hold_command(&[(room.id, morning())], at(3), 600)).await;
        assert_eq!(cutter.cuts(), cuts + 1, "{cut:?}: the COMMIT was cut");
        assert!(matches!(lost, Err(HoldRefused::Store(_))), "{cut:?}: it did not commit: {lost:?}");
        // Nothing of it stayed: the room is free, and its lock (taken by the lost batch) is
        // not held by a forgotten session either, or this would wait and fail as busy.
        let retried = node.hold(cluster.hold_command(&[(room.id, morning())], at(4), 600)).await;
        assert!(retried.is_ok(), "{cut:?}: the room was not free: {retried:?}");
    }
    drop(cutter);
    cluster.finish().await;
}

/// A begin that waits on another session's lock on its key (a retry racing its own first
/// attempt on another node) past the lock timeout fails alone, as busy: the other keys begun
/// with it, in its batch or not, are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_locked_elsewhere_fails_only_its_own_begin() {
    let Some(cluster) = Cluster::start(1).await else { return };
    let node = cluster.nodes[0].clone();
    let attempt = |k: &str, owner: &str| IdempotencyKey { owner: owner.into(), ..key(k) };
    assert_eq!(node.idempotency_begin(&attempt("held", "first"), at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    let mut stuck = PgConnection::connect(&cluster.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut stuck).await.unwrap();
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE key = 'held' FOR UPDATE").execute(&mut stuck).await.unwrap();
    let retry = attempt("held", "retry");
    let fresh: Vec<IdempotencyKey> = (0..8).map(|i| attempt(&format!("fresh-{i}"), "other")).collect();
    // join_all polls in order: all are queued at once, half of them on the locked key's lane.
    let (held, others) = tokio::join!(
        node.idempotency_begin(&retry, at(1), 30),
        futures::future::join_all(fresh.iter().map(|k| node.idempotency_begin(k, at(1), 30)))
    );
    sqlx::query("ROLLBACK").execute(&mut stuck).await.unwrap();
    assert!(matches!(held, Err(StoreError::Busy(_))), "the locked key: {held:?}");
    for other in others {
        assert_eq!(other.unwrap(), IdempotencyBegin::Started);
    }
    assert_eq!(node.idempotency_begin(&retry, at(2), 30).await.unwrap(), IdempotencyBegin::InProgress);
    cluster.finish().await;
}

/// A bookable room of `venue_id`, by the minute.
fn room(venue_id: VenueId) -> Resource {
    let time_model = TimeModel::Free(FreeModel { step_minutes: 1, min_minutes: 1, max_minutes: 1440, schedule: None });
    let rules = ResourceRules::default();
    let (attributes, price_category) = ("{}".into(), None);
    Resource {
        id: ResourceId::new(),
        venue_id,
        name: "Room".into(),
        capacity: 1,
        unit_price: 100,
        attributes,
        price_category,
        time_model,
        rules,
    }
}

/// Node A's `delete_venue` reads the venue's resource ids (the clocks it locks) before its
/// batch; a room added after that read is held on node B, uncommitted when A's batch runs.
/// Were A to go on with the clocks it read, it would neither lock that room nor see its claim,
/// and both would commit: a live hold on a deleted venue. A finds the room's clock unlocked,
/// starts over with it, waits for the hold, and refuses (`VENUE_IN_USE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_venue_is_not_deleted_under_a_hold_on_a_resource_added_since_its_delete_began() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, b) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    cluster.resource(1).await;
    let xa = blocker(&cluster.url, "da").await; // A's lane busy: the deletion reads its keys, then queues
    let pa = tokio::spawn({
        let a = a.clone();
        async move { pause(&a, "da").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = cluster.venue.id;
    let deleting = tokio::spawn({
        let a = a.clone();
        async move { a.delete_venue(v, at(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_room = room(v);
    b.insert_resource(&new_room).await.unwrap();
    let (x0, x1) = (blocker(&cluster.url, "h0").await, blocker(&cluster.url, "h1").await);
    let p0 = tokio::spawn({
        let b = b.clone();
        async move { pause(&b, "h0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cmd = cluster.hold_command(&[(new_room.id, morning())], at(1), 600);
    let holding = tokio::spawn({
        let b = b.clone();
        async move { tokio::join!(b.hold(cmd), pause(&b, "h1")) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x0).await;
    p0.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // B's hold is written, uncommitted
    release(xa).await;
    pa.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    release(x1).await;
    let (deleted, (held, _)) = (deleting.await.unwrap(), holding.await.unwrap());
    assert!(held.is_ok(), "{held:?}");
    assert!(
        matches!(&deleted, Err(StoreError::Conflict(why)) if why.contains("current or future bookings")),
        "the venue was deleted under a live hold: {deleted:?}"
    );
    cluster.finish().await;
}

/// A resource inserted on node B (uncommitted) while node A deletes its venue would escape
/// the deletion's `UPDATE resources … WHERE venue_id` (a row outside its snapshot): a live
/// resource under a deleted venue. The creation holds its venue's row (`FOR KEY SHARE`), the
/// deletion waits for it and then sees the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resource_created_during_its_venues_deletion_does_not_outlive_it() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, b, v) = (cluster.nodes[0].clone(), cluster.nodes[1].clone(), cluster.venue.id);
    let (x0, x1) = (blocker(&cluster.url, "c0").await, blocker(&cluster.url, "c1").await);
    let p0 = tokio::spawn({
        let b = b.clone();
        async move { pause(&b, "c0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (late, b2) = (room(v), b.clone());
    let creating = tokio::spawn(async move { tokio::join!(b2.insert_resource(&late), pause(&b2, "c1")) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x0).await;
    p0.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleting = tokio::spawn({
        let a = a.clone();
        async move { a.delete_venue(v, at(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    release(x1).await;
    let (deleted, (created, _)) = (deleting.await.unwrap(), creating.await.unwrap());
    let live = a.count("resources", &format!("venue_id = '{v}' AND deleted_at IS NULL")).await.unwrap();
    assert!(created.is_ok() && deleted.is_ok(), "{created:?}, {deleted:?}");
    assert_eq!(live, 0, "the venue is deleted with a live resource");
    cluster.finish().await;
}

/// Node A revokes a manager's only venue (the role goes with the last one) while node B creates
/// a venue naming that manager, uncommitted. Were the revocation's count of their venues to
/// miss the new one, it would drop the role and leave them a venue they cannot manage; the
/// creation locks its managers' rows as a role change does, so the revocation waits and sees
/// it. (Had the revocation of the role committed first, the creation would read the roles it
/// left and be refused: conformance, `a_venue_is_created_only_for_managers_who_still_hold_the_role`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_managers_last_venue_during_a_venue_creation_for_them_keeps_their_role() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, b) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let manager = User { roles: vec![Role::Manager], ..admin("m@example.test") };
    a.insert_user(&manager).await.unwrap();
    a.set_manager(cluster.venue.id, manager.id).await.unwrap();
    let second = Venue { id: VenueId::new(), managers: vec![manager.id], ..cluster.venue.clone() };
    let (x0, x1) = (blocker(&cluster.url, "m0").await, blocker(&cluster.url, "m1").await);
    let p0 = tokio::spawn({
        let b = b.clone();
        async move { pause(&b, "m0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let creating = tokio::spawn({
        let b = b.clone();
        async move { tokio::join!(b.insert_venue(&second), pause(&b, "m1")) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x0).await;
    p0.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let revoke = RoleRevoke::Manager(Some(cluster.venue.id));
    let revoking = tokio::spawn({
        let a = a.clone();
        async move { a.revoke_role(manager.id, revoke).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    release(x1).await;
    creating.await.unwrap().0.unwrap();
    revoking.await.unwrap().unwrap();
    let user = b.user_by_id(manager.id).await.unwrap().unwrap();
    assert!(
        user.venues.is_empty() || user.roles.contains(&Role::Manager),
        "venues {:?}, roles {:?}",
        user.venues,
        user.roles
    );
    cluster.finish().await;
}

/// Two nodes' batches grant roles to the same two users in opposite orders, both batches open
/// at once: each holds one user's row and waits for the other's, a deadlock PostgreSQL ends by
/// failing one job. That job's savepoint is rolled back and it runs again in a later batch
/// (`Writer::write_locked_retrying`): every grant succeeds, none fails as busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crosswise_role_grants_on_two_nodes_all_succeed_though_they_deadlock() {
    let Some(cluster) = Cluster::start_with_lanes(2, 1).await else { return };
    let (a, c) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let (u1, u2) = (admin("u1@example.test").id, admin("u2@example.test").id);
    for (id, email) in [(u1, "u1@example.test"), (u2, "u2@example.test")] {
        a.insert_user(&User { id, roles: vec![], ..admin(email) }).await.unwrap();
    }
    let (x0a, x0c) = (blocker(&cluster.url, "ga0").await, blocker(&cluster.url, "gc0").await);
    let (x1a, x1c) = (blocker(&cluster.url, "ga1").await, blocker(&cluster.url, "gc1").await);
    let p0a = tokio::spawn({
        let a = a.clone();
        async move { pause(&a, "ga0").await }
    });
    let p0c = tokio::spawn({
        let c = c.clone();
        async move { pause(&c, "gc0").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each node's next batch: [grant first, (paused request), grant second].
    let crosswise = |node: Arc<PgStore>, first, second, tag: &'static str| {
        tokio::spawn(async move {
            tokio::join!(
                node.grant_role(first, RoleGrant::Customer),
                pause(&node, tag),
                node.grant_role(second, RoleGrant::Customer)
            )
        })
    };
    let (batch_a, batch_c) = (crosswise(a.clone(), u1, u2, "ga1"), crosswise(c.clone(), u2, u1, "gc1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x0a).await;
    release(x0c).await;
    p0a.await.unwrap().unwrap();
    p0c.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(x1a).await;
    release(x1c).await;
    let ((a1, _, a2), (c1, _, c2)) = (batch_a.await.unwrap(), batch_c.await.unwrap());
    for granted in [a1, a2, c1, c2] {
        assert!(granted.is_ok(), "a role grant failed: {:?}", granted.err());
    }
    for user in [u1, u2] {
        assert_eq!(a.user_by_id(user).await.unwrap().unwrap().roles, vec![Role::Customer]);
    }
    cluster.finish().await;
}
