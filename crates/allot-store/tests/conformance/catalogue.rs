//! Venues, resources and events: CRUD, cursor paging, soft delete, and deletes refused while
//! capacity is claimed.

use std::collections::HashSet;

use allot_app::StoreError;
use allot_app::store::{PageRequest, Role};
use allot_core::ids::{EventId, ResourceId, VenueId};
use allot_core::inventory::Venue;

use crate::{Backend, DAY, HOUR, MINUTE, World, all_pages, at, event, everything, free_resource, seat, span, venue_in};

fn assert_ascending_unique(ids: &[uuid::Uuid], what: &str) {
    let mut sorted = ids.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "{what}: duplicates across pages");
    assert_eq!(sorted, ids, "{what}: pages are in id order");
}

pub async fn venue_insert_get_update(b: &Backend) {
    let s = b.store();
    let mut v = venue_in("Europe/Berlin");
    s.insert_venue(&v).await.unwrap();
    assert_eq!(s.venue(v.id).await.unwrap().as_deref(), Some(&v));
    assert_eq!(s.venue(VenueId::new()).await.unwrap(), None);

    match s.insert_venue(&v).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("inserting the same venue id twice: expected Conflict, got {other:?}"),
    }

    let before = v.clone();
    v.name = "Renamed".into();
    v.rating = 3.25;
    v.amenities.push("parking".into());
    v.policies.hold_ttl_seconds = 120;
    s.update_venue(&before, &v).await.unwrap();
    assert_eq!(s.venue(v.id).await.unwrap().as_deref(), Some(&v));
    match s.update_venue(&before, &v).await {
        Err(StoreError::Changed("venue")) => {}
        other => panic!("updating a venue over a version no longer stored: expected Changed, got {other:?}"),
    }
    assert_eq!(s.venue(v.id).await.unwrap().as_deref(), Some(&v), "a refused update writes nothing");

    let ghost = venue_in("UTC");
    match s.update_venue(&ghost, &ghost).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("updating a missing venue: expected NotFound, got {other:?}"),
    }
    assert_eq!(s.venue(ghost.id).await.unwrap(), None, "update does not insert");
}

pub async fn venues_cursor_paging_is_complete_and_ordered(b: &Backend) {
    let s = b.store();
    let mut inserted: Vec<Venue> = Vec::new();
    for _ in 0..23 {
        let v = venue_in("UTC");
        s.insert_venue(&v).await.unwrap();
        inserted.push(v);
    }
    for limit in [1, 5, 7, 23, 100] {
        let got = all_pages(
            limit,
            |v: &Venue| v.id.as_uuid(),
            |page| {
                let s = s.clone();
                async move { s.venues(page).await.unwrap() }
            },
        )
        .await;
        let ids: Vec<uuid::Uuid> = got.iter().map(|v| v.id.as_uuid()).collect();
        assert_ascending_unique(&ids, &format!("venues, limit {limit}"));
        assert_eq!(got.len(), inserted.len(), "limit {limit}: every venue exactly once");
        for v in &inserted {
            assert!(got.contains(v), "limit {limit}: venue {} missing", v.id);
        }
    }
    // Exactly one full page: no successor.
    let page = s.venues(PageRequest { after: None, limit: 23 }).await.unwrap();
    assert_eq!((page.items.len(), page.next_after), (23, None));
    // Past the last id: empty.
    let last = inserted.iter().map(|v| v.id.as_uuid()).max().unwrap();
    let page = s.venues(PageRequest { after: Some(last), limit: 10 }).await.unwrap();
    assert!(page.items.is_empty() && page.next_after.is_none());

    // Soft-deleted venues drop out of the list.
    s.delete_venue(inserted[4].id, at(0)).await.unwrap();
    let got = all_pages(
        6,
        |v: &Venue| v.id.as_uuid(),
        |page| {
            let s = s.clone();
            async move { s.venues(page).await.unwrap() }
        },
    )
    .await;
    assert_eq!(got.len(), 22);
    assert!(!got.iter().any(|v| v.id == inserted[4].id));
}

pub async fn resources_paging_per_venue_and_soft_delete(b: &Backend) {
    let w = World::new(b).await;
    let s = &w.store;
    let other = World::new(b).await;
    let mut mine = Vec::new();
    for i in 0..12 {
        mine.push(w.resource(1 + i).await);
    }
    for _ in 0..3 {
        other.resource(1).await;
    }
    let venue_id = w.venue.id;
    let list = |limit| {
        let s = s.clone();
        all_pages(
            limit,
            |r: &allot_core::inventory::Resource| r.id.as_uuid(),
            move |page| {
                let s = s.clone();
                async move { s.resources(venue_id, page).await.unwrap() }
            },
        )
    };
    for limit in [1, 5, 12, 50] {
        let got = list(limit).await;
        let ids: Vec<uuid::Uuid> = got.iter().map(|r| r.id.as_uuid()).collect();
        assert_ascending_unique(&ids, &format!("resources, limit {limit}"));
        assert_eq!(got.len(), 12, "limit {limit}: only this venue's resources, each once");
        for r in &mine {
            assert!(got.contains(r), "limit {limit}: resource {} missing", r.id);
        }
    }

    // Get and update round-trip the whole record.
    let mut r = mine[3].clone();
    assert_eq!(s.resource(r.id).await.unwrap().as_deref(), Some(&r));
    let before = r.clone();
    r.name = "Renamed".into();
    r.capacity = 42;
    r.rules.buffer_after_minutes = 15;
    r.attributes = r#"{"floor":2,"view":"sea"}"#.into();
    s.update_resource(&before, &r).await.unwrap();
    assert_eq!(s.resource(r.id).await.unwrap().as_deref(), Some(&r));
    let mut closed = before.clone();
    closed.capacity = 0;
    match s.update_resource(&before, &closed).await {
        Err(StoreError::Changed("resource")) => {}
        other => panic!("updating a resource over a version no longer stored: expected Changed, got {other:?}"),
    }
    assert_eq!(s.resource(r.id).await.unwrap().as_deref(), Some(&r), "a refused update writes nothing");
    let ghost = free_resource(w.venue.id, 1);
    match s.update_resource(&ghost, &ghost).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("updating a missing resource: expected NotFound, got {other:?}"),
    }
    match s.insert_resource(&r).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("inserting the same resource id twice: expected Conflict, got {other:?}"),
    }

    // Soft delete hides it everywhere.
    s.delete_resource(r.id, at(0)).await.unwrap();
    assert_eq!(s.resource(r.id).await.unwrap(), None);
    assert_eq!(list(5).await.len(), 11);
    assert!(!list(5).await.iter().any(|x| x.id == r.id));
    assert!(s.resources_by_ids(&[r.id]).await.unwrap().is_empty());
    match s.update_resource(&r, &r).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("updating a deleted resource: expected NotFound, got {other:?}"),
    }
    match s.delete_resource(r.id, at(1)).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("deleting a deleted resource: expected NotFound, got {other:?}"),
    }
}

pub async fn resources_by_ids_returns_live_ones_only(b: &Backend) {
    let w = World::new(b).await;
    let other = World::new(b).await;
    let (r1, r2, r3) = (w.resource(1).await, w.resource(2).await, w.resource(3).await);
    let foreign = other.resource(4).await;
    w.store.delete_resource(r2.id, at(0)).await.unwrap();

    let got = w.store.resources_by_ids(&[r3.id, ResourceId::new(), r1.id, r2.id, foreign.id]).await.unwrap();
    let mut got_ids: Vec<ResourceId> = got.iter().map(|r| r.id).collect();
    got_ids.sort();
    let mut want = vec![r1.id, r3.id, foreign.id];
    want.sort();
    assert_eq!(got_ids, want, "live resources among the ids, missing and deleted left out");
    for r in [&r1, &r3, &foreign] {
        assert!(got.contains(r), "full records returned");
    }
    assert!(w.store.resources_by_ids(&[]).await.unwrap().is_empty());
    // Many ids at once.
    let mut many: Vec<ResourceId> = (0..700).map(|_| ResourceId::new()).collect();
    many.push(r1.id);
    assert_eq!(w.store.resources_by_ids(&many).await.unwrap(), vec![r1.clone()]);
}

pub async fn events_insert_list_and_events_of_seat(b: &Backend) {
    let w = World::new(b).await;
    let s = &w.store;
    let (s1, s2, s3) = (seat(w.venue.id, "A1"), seat(w.venue.id, "A2"), seat(w.venue.id, "A3"));
    for r in [&s1, &s2, &s3] {
        s.insert_resource(r).await.unwrap();
    }
    // e2 is inserted first but starts later: events_of_seat orders by start, not by id.
    let e2 = event(w.venue.id, 11 * HOUR, 13 * HOUR, &[s2.id]);
    let e1 = event(w.venue.id, 10 * HOUR, 12 * HOUR, &[s1.id, s2.id]);
    let e3 = event(w.venue.id, 14 * HOUR, 15 * HOUR, &[s1.id]);
    for e in [&e2, &e1, &e3] {
        s.insert_event(e).await.unwrap();
    }
    assert_eq!(s.event(e1.id).await.unwrap().as_deref(), Some(&e1));
    assert_eq!(s.event(EventId::new()).await.unwrap(), None);

    let ids = |events: Vec<allot_core::inventory::Event>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(s.events_of_seat(s2.id, span(0, DAY), 10).await.unwrap()), vec![e1.id, e2.id]);
    assert_eq!(ids(s.events_of_seat(s1.id, span(0, DAY), 10).await.unwrap()), vec![e1.id, e3.id]);
    assert_eq!(ids(s.events_of_seat(s1.id, span(0, DAY), 1).await.unwrap()), vec![e1.id], "limit");
    // Half-open windows: touching is not overlapping.
    assert!(s.events_of_seat(s1.id, span(12 * HOUR, 14 * HOUR), 10).await.unwrap().is_empty());
    assert_eq!(ids(s.events_of_seat(s1.id, span(12 * HOUR - 1, 14 * HOUR + 1), 10).await.unwrap()), vec![e1.id, e3.id]);
    assert!(s.events_of_seat(s3.id, span(0, DAY), 10).await.unwrap().is_empty());
    assert_eq!(s.events_of_seat(s2.id, span(0, DAY), 10).await.unwrap()[0], e1, "full records");

    // Listing per venue with paging.
    let other = World::new(b).await;
    let foreign_seat = seat(other.venue.id, "B1");
    other.store.insert_resource(&foreign_seat).await.unwrap();
    other.store.insert_event(&event(other.venue.id, HOUR, 2 * HOUR, &[foreign_seat.id])).await.unwrap();
    let mut more = vec![e1.clone(), e2.clone(), e3.clone()];
    for i in 0..5 {
        let e = event(w.venue.id, 20 * HOUR + i * HOUR, 20 * HOUR + i * HOUR + 30 * MINUTE, &[s3.id]);
        s.insert_event(&e).await.unwrap();
        more.push(e);
    }
    let venue_id = w.venue.id;
    for limit in [1, 3, 8, 20] {
        let got = all_pages(
            limit,
            |e: &allot_core::inventory::Event| e.id.as_uuid(),
            |page| {
                let s = s.clone();
                async move { s.events(venue_id, page).await.unwrap() }
            },
        )
        .await;
        let got_ids: Vec<uuid::Uuid> = got.iter().map(|e| e.id.as_uuid()).collect();
        assert_ascending_unique(&got_ids, &format!("events, limit {limit}"));
        assert_eq!(got.len(), more.len(), "limit {limit}: this venue's events, each once");
        let want: HashSet<EventId> = more.iter().map(|e| e.id).collect();
        assert!(got.iter().all(|e| want.contains(&e.id)));
    }
}

pub async fn delete_resource_refuses_while_claimed(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(2).await;
    let booking = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    match w.store.delete_resource(r.id, at(1)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a held resource: expected Conflict, got {other:?}"),
    }
    assert!(w.store.resource(r.id).await.unwrap().is_some(), "refused delete changes nothing");
    w.confirm(booking.id, at(2)).await;
    match w.store.delete_resource(r.id, at(3)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a booked resource: expected Conflict, got {other:?}"),
    }
    w.cancel(booking.id, at(4)).await;
    w.store.delete_resource(r.id, at(5)).await.unwrap();
    assert_eq!(w.store.resource(r.id).await.unwrap(), None);

    // A booking entirely in the past does not block deleting.
    let old = w.resource(1).await;
    let past = w.held(&[(old.id, span(10 * MINUTE, 20 * MINUTE), 1)], at(6), 600).await;
    w.confirm(past.id, at(7)).await;
    w.store.delete_resource(old.id, at(HOUR)).await.unwrap();
    assert_eq!(w.store.resource(old.id).await.unwrap(), None);
}

pub async fn delete_venue_refuses_while_claimed_and_hides_everything(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let s1 = seat(w.venue.id, "S1");
    w.store.insert_resource(&s1).await.unwrap();
    let e = event(w.venue.id, 5 * HOUR, 6 * HOUR, &[s1.id]);
    w.store.insert_event(&e).await.unwrap();
    let booking = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;

    match w.store.delete_venue(w.venue.id, at(1)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a venue with a hold: expected Conflict, got {other:?}"),
    }
    assert!(w.store.venue(w.venue.id).await.unwrap().is_some());
    w.confirm(booking.id, at(2)).await;
    match w.store.delete_venue(w.venue.id, at(3)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a venue with a confirmed booking: expected Conflict, got {other:?}"),
    }
    w.cancel(booking.id, at(4)).await;
    w.store.delete_venue(w.venue.id, at(5)).await.unwrap();

    assert_eq!(w.store.venue(w.venue.id).await.unwrap(), None);
    assert_eq!(w.store.resource(r.id).await.unwrap(), None, "its resources go with it");
    assert_eq!(w.store.resource(s1.id).await.unwrap(), None);
    assert_eq!(w.store.event(e.id).await.unwrap(), None, "its events go with it");
    let page = PageRequest { after: None, limit: 100 };
    assert!(w.store.resources(w.venue.id, page).await.unwrap().items.is_empty());
    assert!(w.store.events(w.venue.id, page).await.unwrap().items.is_empty());
    assert!(w.store.events_of_seat(s1.id, everything(), 10).await.unwrap().is_empty());
    assert!(!w.store.venues(page).await.unwrap().items.iter().any(|v| v.id == w.venue.id));
    // Nothing there can be held any more.
    assert!(matches!(
        w.hold(&[(r.id, span(3 * HOUR, 4 * HOUR), 1)], at(6), 600).await,
        Err(allot_app::store::HoldRefused::Stale { item_index: 0 })
    ));
}

/// A hold that has lapsed keeps nothing from being deleted, swept or not yet: it claims no
/// capacity any more (I2), and the sweep that expires it may come a moment later.
pub async fn lapsed_holds_do_not_block_deletion(b: &Backend) {
    let w = World::new(b).await;
    let (r1, r2) = (w.resource(1).await, w.resource(1).await);
    w.held(&[(r1.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    w.held(&[(r2.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    // A store's clock never runs back (`WriteCtx::now`): both refusals first.
    match w.store.delete_resource(r1.id, at(599)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a resource under a live hold: expected Conflict, got {other:?}"),
    }
    match w.store.delete_venue(w.venue.id, at(599)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a venue under a live hold: expected Conflict, got {other:?}"),
    }
    w.store.delete_resource(r1.id, at(600)).await.unwrap();
    assert_eq!(w.store.resource(r1.id).await.unwrap(), None);
    w.store.delete_venue(w.venue.id, at(600)).await.unwrap();
    assert_eq!(w.store.venue(w.venue.id).await.unwrap(), None);
}

/// Nothing is created under a deleted venue: a resource or event whose request checked its
/// venue before a deletion committed is refused by the write itself.
pub async fn nothing_is_created_under_a_deleted_venue(b: &Backend) {
    let w = World::new(b).await;
    w.store.delete_venue(w.venue.id, at(1)).await.unwrap();
    let late = seat(w.venue.id, "S9");
    match w.store.insert_resource(&late).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("a resource under a deleted venue: expected NotFound, got {other:?}"),
    }
    assert_eq!(w.store.resource(late.id).await.unwrap(), None);
    let show = event(w.venue.id, 5 * HOUR, 6 * HOUR, &[]);
    match w.store.insert_event(&show).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("an event under a deleted venue: expected NotFound, got {other:?}"),
    }
    assert_eq!(w.store.event(show.id).await.unwrap(), None);
}

/// Only current and future bookings keep a venue (or a resource) from being deleted: a
/// confirmed booking that is over does not.
pub async fn bookings_in_the_past_do_not_block_deletion(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let booking = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    w.confirm(booking.id, at(1)).await;
    match w.store.delete_venue(w.venue.id, at(2 * HOUR - 1)).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("deleting a venue during a booking: expected Conflict, got {other:?}"),
    }
    w.store.delete_venue(w.venue.id, at(2 * HOUR)).await.unwrap();
    assert_eq!(w.store.venue(w.venue.id).await.unwrap(), None);
    assert_eq!(w.store.booking(booking.id).await.unwrap().unwrap().status.as_str(), "confirmed", "history is kept");
}

/// A venue created by a manager is theirs from its own transaction on: no window in which it
/// exists without the manager who made it.
pub async fn venue_insert_records_its_managers_with_it(b: &Backend) {
    let s = b.store();
    let manager = crate::user("maker@managers.test", vec![allot_app::store::Role::Manager]);
    s.insert_user(&manager).await.unwrap();
    let mut venue = crate::venue_in("UTC");
    venue.managers = vec![manager.id];
    s.insert_venue(&venue).await.unwrap();
    assert_eq!(s.user_by_id(manager.id).await.unwrap().unwrap().venues, vec![venue.id]);
    // A second insert of the same id is a conflict and adds nobody.
    let other = crate::user("other@managers.test", vec![allot_app::store::Role::Manager]);
    s.insert_user(&other).await.unwrap();
    venue.managers = vec![other.id];
    assert!(matches!(s.insert_venue(&venue).await, Err(allot_app::StoreError::Conflict(_))));
    assert!(s.user_by_id(other.id).await.unwrap().unwrap().venues.is_empty());
}

/// A venue is created for a manager only while they hold the role, checked in its write: a
/// revocation that commits between the request's check and its write must not leave them
/// managing it (their row would count again the day the role is granted back).
pub async fn a_venue_is_created_only_for_managers_who_still_hold_the_role(b: &Backend) {
    let s = b.store();
    let manager = crate::user("still-manager@test.allot", vec![Role::Manager]);
    let revoked = crate::user("revoked-manager@test.allot", vec![Role::Customer]);
    s.insert_user(&manager).await.unwrap();
    s.insert_user(&revoked).await.unwrap();
    let mut refused = venue_in("UTC");
    refused.managers = vec![revoked.id];
    assert!(matches!(s.insert_venue(&refused).await, Err(StoreError::Forbidden(_))));
    assert!(s.venue(refused.id).await.unwrap().is_none(), "nothing of it kept");
    let user = s.user_by_id(revoked.id).await.unwrap().unwrap();
    assert!(user.venues.is_empty(), "{:?}", user.venues);
    let mut unknown = venue_in("UTC");
    unknown.managers = vec![allot_core::ids::UserId::new()];
    assert!(matches!(s.insert_venue(&unknown).await, Err(StoreError::Forbidden(_))));

    let mut kept = venue_in("UTC");
    kept.managers = vec![manager.id, manager.id];
    s.insert_venue(&kept).await.unwrap();
    assert_eq!(s.user_by_id(manager.id).await.unwrap().unwrap().venues, vec![kept.id]);
    // A venue with no managers (an admin's) needs none.
    s.insert_venue(&venue_in("UTC")).await.unwrap();
}
