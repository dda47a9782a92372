//! Roles granted and revoked, the last admin kept, partner API keys stored and revoked.

use std::collections::BTreeSet;

use allot_app::StoreError;
use allot_app::access::{ApiKey, LAST_ADMIN, RoleGrant, RoleRevoke, Scope};
use allot_app::store::{PageRequest, Role, User};
use allot_core::ids::{ApiKeyId, UserId, VenueId};

use crate::{Backend, all_pages, at, user, venue_in};

fn sorted(mut venues: Vec<VenueId>) -> Vec<VenueId> {
    venues.sort();
    venues
}

fn has(u: &User, role: Role) -> bool {
    u.roles.contains(&role)
}

pub async fn roles_are_granted_and_revoked(b: &Backend) {
    let s = b.store();
    let u = user("staff@example.test", vec![Role::Customer]);
    s.insert_user(&u).await.unwrap();
    let (v1, v2) = (venue_in("UTC"), venue_in("UTC"));
    s.insert_venue(&v1).await.unwrap();
    s.insert_venue(&v2).await.unwrap();

    let after = s.grant_role(u.id, RoleGrant::Manager(v1.id)).await.unwrap();
    assert!(has(&after, Role::Manager) && has(&after, Role::Customer), "{after:?}");
    assert_eq!(after.venues, vec![v1.id]);
    s.grant_role(u.id, RoleGrant::Manager(v2.id)).await.unwrap();
    // Granting twice changes nothing.
    let after = s.grant_role(u.id, RoleGrant::Manager(v2.id)).await.unwrap();
    assert_eq!(after.roles.iter().filter(|r| **r == Role::Manager).count(), 1, "{after:?}");
    assert_eq!(sorted(after.venues.clone()), sorted(vec![v1.id, v2.id]));
    assert_eq!(s.user_by_id(u.id).await.unwrap().unwrap(), after, "what is returned is what is stored");

    // One venue less: still a manager. A venue never managed: nothing changes.
    let after = s.revoke_role(u.id, RoleRevoke::Manager(Some(v1.id))).await.unwrap();
    assert!(has(&after, Role::Manager));
    assert_eq!(after.venues, vec![v2.id]);
    let unchanged = s.revoke_role(u.id, RoleRevoke::Manager(Some(VenueId::new()))).await.unwrap();
    assert_eq!(unchanged, after);
    // The last venue takes the manager role with it.
    let after = s.revoke_role(u.id, RoleRevoke::Manager(Some(v2.id))).await.unwrap();
    assert!(!has(&after, Role::Manager) && after.venues.is_empty(), "{after:?}");
    assert!(has(&after, Role::Customer));

    // Without a venue: the manager role and every venue at once.
    s.grant_role(u.id, RoleGrant::Manager(v1.id)).await.unwrap();
    s.grant_role(u.id, RoleGrant::Manager(v2.id)).await.unwrap();
    let after = s.revoke_role(u.id, RoleRevoke::Manager(None)).await.unwrap();
    assert!(!has(&after, Role::Manager) && after.venues.is_empty(), "{after:?}");
    assert_eq!(b.count("venue_managers", "1=1").await, 0);

    let after = s.grant_role(u.id, RoleGrant::Admin).await.unwrap();
    assert!(has(&after, Role::Admin));
    let after = s.revoke_role(u.id, RoleRevoke::Customer).await.unwrap();
    assert_eq!(after.roles, vec![Role::Admin]);
    let after = s.grant_role(u.id, RoleGrant::Customer).await.unwrap();
    assert!(has(&after, Role::Customer) && has(&after, Role::Admin));

    for result in
        [s.grant_role(UserId::new(), RoleGrant::Admin).await, s.revoke_role(UserId::new(), RoleRevoke::Customer).await]
    {
        assert!(matches!(result, Err(StoreError::NotFound("user"))), "{result:?}");
    }
}

pub async fn the_last_admin_keeps_the_role(b: &Backend) {
    let s = b.store();
    let a = user("a@example.test", vec![Role::Admin]);
    let c = user("c@example.test", vec![Role::Customer, Role::Admin]);
    s.insert_user(&a).await.unwrap();
    s.insert_user(&c).await.unwrap();

    let after = s.revoke_role(c.id, RoleRevoke::Admin).await.unwrap();
    assert_eq!(after.roles, vec![Role::Customer]);
    match s.revoke_role(a.id, RoleRevoke::Admin).await {
        Err(StoreError::Conflict(m)) => assert_eq!(m, LAST_ADMIN),
        other => panic!("revoking the last admin: {other:?}"),
    }
    assert_eq!(s.user_by_id(a.id).await.unwrap().unwrap().roles, vec![Role::Admin], "unchanged");
    // Revoking the admin role of a non-admin is harmless, even with one admin left.
    assert_eq!(s.revoke_role(c.id, RoleRevoke::Admin).await.unwrap().roles, vec![Role::Customer]);
}

pub async fn admins_revoking_each_other_at_once_leave_one(b: &Backend) {
    let s = b.store();
    let first = user("admin-0@example.test", vec![Role::Admin]);
    s.insert_user(&first).await.unwrap();
    let mut survivor = first.id;
    // Each round: exactly two admins, each one's admin role revoked at the same moment.
    for round in 1..=10 {
        let newcomer = user(&format!("admin-{round}@example.test"), vec![Role::Admin]);
        s.insert_user(&newcomer).await.unwrap();
        let revoke = |id: UserId| {
            let s = s.clone();
            tokio::spawn(async move { (id, s.revoke_role(id, RoleRevoke::Admin).await) })
        };
        let (a, b2) = (revoke(survivor), revoke(newcomer.id));
        let outcomes = [a.await.unwrap(), b2.await.unwrap()];
        let refused: Vec<UserId> =
            outcomes.iter().filter(|(_, o)| matches!(o, Err(StoreError::Conflict(_)))).map(|(id, _)| *id).collect();
        assert_eq!(refused.len(), 1, "round {round}: exactly one is refused: {outcomes:?}");
        assert_eq!(outcomes.iter().filter(|(_, o)| o.is_ok()).count(), 1, "round {round}: {outcomes:?}");
        assert_eq!(b.count("users", "(',' || roles || ',') LIKE '%,admin,%'").await, 1, "round {round}");
        survivor = refused[0];
        assert!(has(&s.user_by_id(survivor).await.unwrap().unwrap(), Role::Admin), "round {round}");
    }
}

fn key(name: &str, hash: &str, scopes: &[Scope], created_at: i64) -> ApiKey {
    ApiKey {
        id: ApiKeyId::new(),
        name: name.into(),
        key_hash: hash.into(),
        scopes: scopes.iter().copied().collect::<BTreeSet<_>>(),
        created_by: UserId::new(),
        created_at: at(created_at),
        revoked_at: None,
    }
}

pub async fn api_keys_are_found_by_digest_listed_and_revoked(b: &Backend) {
    let s = b.store();
    let k1 = key("OTA", "digest-1", &[Scope::BookingsRead, Scope::BookingsWrite], 10);
    let k2 = key("Flights", "digest-2", &[Scope::InventoryRead], 11);
    let k3 = key("Empty", "digest-3", &[Scope::BookingsRead], 12);
    for k in [&k1, &k2, &k3] {
        s.insert_api_key(k).await.unwrap();
    }
    assert_eq!(s.api_key_by_hash("digest-1").await.unwrap(), Some(k1.clone()));
    assert_eq!(s.api_key_by_hash("digest-2").await.unwrap(), Some(k2.clone()));
    assert_eq!(s.api_key_by_hash("digest-").await.unwrap(), None);
    assert_eq!(s.api_key_by_hash("DIGEST-1").await.unwrap(), None, "digests match exactly");

    let twin = key("Twin", "digest-1", &[Scope::BookingsRead], 13);
    assert!(matches!(s.insert_api_key(&twin).await, Err(StoreError::Conflict(_))), "one key per digest");

    let store = s.clone();
    let listed = all_pages(
        2,
        |k: &ApiKey| k.id.as_uuid(),
        |page: PageRequest| {
            let store = store.clone();
            async move { store.api_keys(page).await.unwrap() }
        },
    )
    .await;
    assert_eq!(listed, vec![k1.clone(), k2.clone(), k3.clone()], "every key, in creation order");

    s.revoke_api_key(k1.id, at(20)).await.unwrap();
    assert_eq!(s.api_key_by_hash("digest-1").await.unwrap(), None, "a revoked key is not found");
    // Revoking again keeps the first time.
    s.revoke_api_key(k1.id, at(30)).await.unwrap();
    let page = s.api_keys(PageRequest { after: None, limit: 10 }).await.unwrap();
    assert_eq!(page.items[0].revoked_at, Some(at(20)), "{:?}", page.items[0]);
    assert_eq!(page.items[1].revoked_at, None);
    assert_eq!(page.items.len(), 3, "revoked keys stay listed");
    assert_eq!(s.api_key_by_hash("digest-2").await.unwrap(), Some(k2));

    assert!(matches!(s.revoke_api_key(ApiKeyId::new(), at(40)).await, Err(StoreError::NotFound(_))));
}
