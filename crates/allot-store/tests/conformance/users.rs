//! Users, manager assignments, refresh tokens and settings.

use allot_app::StoreError;
use allot_app::store::{RefreshToken, Role, RotateOutcome};
use allot_core::ids::{UserId, VenueId};

use crate::{Backend, at, user, venue_in};

pub async fn users_insert_lookup_and_duplicate_email(b: &Backend) {
    let s = b.store();
    let ada = user("ada@example.test", vec![Role::Customer, Role::Manager]);
    s.insert_user(&ada).await.unwrap();

    assert_eq!(s.user_by_email("ada@example.test").await.unwrap().as_ref(), Some(&ada));
    assert_eq!(s.user_by_id(ada.id).await.unwrap().as_ref(), Some(&ada));
    assert_eq!(s.user_by_email("nobody@example.test").await.unwrap(), None);
    assert_eq!(s.user_by_id(UserId::new()).await.unwrap(), None);

    // Same e-mail, another id: refused as a conflict, nothing stored.
    let twin = user("ada@example.test", vec![Role::Customer]);
    match s.insert_user(&twin).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("duplicate e-mail: expected Conflict, got {other:?}"),
    }
    assert_eq!(s.user_by_id(twin.id).await.unwrap(), None);
    assert_eq!(b.count("users", "1=1").await, 1);

    let bob = user("bob@example.test", vec![Role::Admin]);
    s.insert_user(&bob).await.unwrap();
    assert_eq!(s.user_by_email("bob@example.test").await.unwrap().map(|u| u.roles), Some(vec![Role::Admin]));
    assert_eq!(b.count("users", "1=1").await, 2);
}

/// A user read once (a store may keep it for the next request) shows every later change to
/// its roles and venues: the venue it manages from creation, a granted role.
pub async fn user_reads_see_each_committed_change(b: &Backend) {
    let s = b.store();
    let u = user("reread@example.test", vec![Role::Customer, Role::Manager]);
    s.insert_user(&u).await.unwrap();
    assert!(s.user_by_id(u.id).await.unwrap().unwrap().venues.is_empty());
    let mut v = venue_in("UTC");
    v.managers = vec![u.id];
    s.insert_venue(&v).await.unwrap();
    assert_eq!(s.user_by_id(u.id).await.unwrap().unwrap().venues, vec![v.id], "managed from creation");
    s.grant_role(u.id, allot_app::access::RoleGrant::Admin).await.unwrap();
    assert!(s.user_by_id(u.id).await.unwrap().unwrap().roles.contains(&Role::Admin));
    s.revoke_role(u.id, allot_app::access::RoleRevoke::Admin).await.ok();
    s.revoke_role(u.id, allot_app::access::RoleRevoke::Customer).await.unwrap();
    assert!(!s.user_by_id(u.id).await.unwrap().unwrap().roles.contains(&Role::Customer));
}

pub async fn set_manager_lists_venues(b: &Backend) {
    let s = b.store();
    let manager = user("manager@example.test", vec![Role::Manager]);
    s.insert_user(&manager).await.unwrap();
    let (v1, v2, v3) = (venue_in("UTC"), venue_in("UTC"), venue_in("UTC"));
    for v in [&v1, &v2, &v3] {
        s.insert_venue(v).await.unwrap();
    }
    assert!(s.user_by_id(manager.id).await.unwrap().unwrap().venues.is_empty());

    s.set_manager(v2.id, manager.id).await.unwrap();
    s.set_manager(v1.id, manager.id).await.unwrap();
    // Assigning twice is harmless.
    s.set_manager(v1.id, manager.id).await.unwrap();

    let mut want: Vec<VenueId> = vec![v1.id, v2.id];
    want.sort();
    for found in
        [s.user_by_id(manager.id).await.unwrap().unwrap(), s.user_by_email(&manager.email).await.unwrap().unwrap()]
    {
        let mut venues = found.venues.clone();
        venues.sort();
        assert_eq!(venues, want, "each managed venue listed once");
    }

    // Another user's assignments are their own.
    let other = user("other@example.test", vec![Role::Manager]);
    s.insert_user(&other).await.unwrap();
    s.set_manager(v3.id, other.id).await.unwrap();
    assert_eq!(s.user_by_id(other.id).await.unwrap().unwrap().venues, vec![v3.id]);
    assert_eq!(s.user_by_id(manager.id).await.unwrap().unwrap().venues.len(), 2);
}

fn token(hash: &str, user_id: UserId, family: &str, expires_at: i64) -> RefreshToken {
    RefreshToken { token_hash: hash.into(), user_id, family_id: family.into(), expires_at: at(expires_at) }
}

pub async fn refresh_token_rotation_and_reuse_revokes_the_family(b: &Backend) {
    let s = b.store();
    let u = user("tokens@example.test", vec![Role::Customer]);
    s.insert_user(&u).await.unwrap();
    s.insert_refresh_token(&token("h1", u.id, "fam-a", 3600)).await.unwrap();
    s.insert_refresh_token(&token("g1", u.id, "fam-b", 3600)).await.unwrap();

    assert_eq!(
        s.rotate_refresh_token("h1", "h2", at(7200), at(10)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    assert_eq!(
        s.rotate_refresh_token("h2", "h3", at(7200), at(20)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    assert_eq!(b.count("refresh_tokens", "family_id = 'fam-a'").await, 3);

    // h1 was already used: someone else has a copy. The whole family ends.
    assert_eq!(s.rotate_refresh_token("h1", "hx", at(7200), at(30)).await.unwrap(), RotateOutcome::Reused);
    assert_eq!(s.rotate_refresh_token("h3", "h4", at(7200), at(40)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(s.rotate_refresh_token("h2", "h5", at(7200), at(41)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(b.count("refresh_tokens", "token_hash IN ('hx', 'h4', 'h5')").await, 0, "no token issued");

    // The user's other family (another device) is untouched.
    assert_eq!(
        s.rotate_refresh_token("g1", "g2", at(7200), at(50)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    assert_eq!(
        s.rotate_refresh_token("g2", "g3", at(7200), at(60)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
}

pub async fn refresh_token_expiry_and_unknown_are_invalid(b: &Backend) {
    let s = b.store();
    let u = user("expiry@example.test", vec![Role::Customer]);
    s.insert_user(&u).await.unwrap();
    s.insert_refresh_token(&token("e1", u.id, "fam-e1", 100)).await.unwrap();
    s.insert_refresh_token(&token("e2", u.id, "fam-e2", 100)).await.unwrap();

    assert_eq!(s.rotate_refresh_token("unknown", "n", at(500), at(1)).await.unwrap(), RotateOutcome::Invalid);
    // Valid until just before expires_at, invalid from it on.
    assert_eq!(
        s.rotate_refresh_token("e1", "e1b", at(150), at(99)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    assert_eq!(s.rotate_refresh_token("e2", "e2b", at(150), at(100)).await.unwrap(), RotateOutcome::Invalid);
    // The rotated token carries its own expiry.
    assert_eq!(s.rotate_refresh_token("e1b", "e1c", at(300), at(150)).await.unwrap(), RotateOutcome::Invalid);
}

pub async fn revoke_ends_the_whole_family(b: &Backend) {
    let s = b.store();
    let u = user("logout@example.test", vec![Role::Customer]);
    s.insert_user(&u).await.unwrap();

    // Revoking the current token.
    s.insert_refresh_token(&token("k1", u.id, "fam-k", 3600)).await.unwrap();
    assert!(matches!(
        s.rotate_refresh_token("k1", "k2", at(3600), at(1)).await.unwrap(),
        RotateOutcome::Rotated { .. }
    ));
    s.revoke_refresh_token("k2", at(2)).await.unwrap();
    assert_eq!(s.rotate_refresh_token("k2", "k3", at(3600), at(3)).await.unwrap(), RotateOutcome::Invalid);

    // Revoking an old (already rotated) token ends its descendants too.
    s.insert_refresh_token(&token("m1", u.id, "fam-m", 3600)).await.unwrap();
    assert!(matches!(
        s.rotate_refresh_token("m1", "m2", at(3600), at(4)).await.unwrap(),
        RotateOutcome::Rotated { .. }
    ));
    s.revoke_refresh_token("m1", at(5)).await.unwrap();
    assert_eq!(s.rotate_refresh_token("m2", "m3", at(3600), at(6)).await.unwrap(), RotateOutcome::Invalid);

    // Revoking an unknown token is not an error; other families stay valid.
    s.insert_refresh_token(&token("p1", u.id, "fam-p", 3600)).await.unwrap();
    s.revoke_refresh_token("no-such-token", at(7)).await.unwrap();
    assert!(matches!(
        s.rotate_refresh_token("p1", "p2", at(3600), at(8)).await.unwrap(),
        RotateOutcome::Rotated { .. }
    ));
}

pub async fn setting_or_insert_keeps_the_first_value_under_concurrency(b: &Backend) {
    let s = b.store();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.setting_or_insert("instance_secret", &format!("value-{i}")).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    let first = answers[0].clone();
    assert!(answers.iter().all(|a| *a == first), "all callers see one value: {answers:?}");
    assert!((0..20).any(|i| first == format!("value-{i}")), "the value is one of those offered: {first}");
    assert_eq!(s.setting_or_insert("instance_secret", "late").await.unwrap(), first);
    assert_eq!(b.count("settings", "key = 'instance_secret'").await, 1);
}

pub async fn set_setting_overwrites(b: &Backend) {
    let s = b.store();
    assert_eq!(s.setting_or_insert("a", "1").await.unwrap(), "1");
    s.set_setting("a", "2").await.unwrap();
    assert_eq!(s.setting_or_insert("a", "3").await.unwrap(), "2");
    s.set_setting("fresh", "x").await.unwrap();
    assert_eq!(s.setting_or_insert("fresh", "y").await.unwrap(), "x");
    s.set_setting("fresh", "").await.unwrap();
    assert_eq!(s.setting_or_insert("fresh", "z").await.unwrap(), "");
    assert_eq!(s.setting_or_insert("a", "4").await.unwrap(), "2", "other keys untouched");
}

pub async fn concurrent_rotation_of_one_token_rotates_once(b: &Backend) {
    let s = b.store();
    let u = user("race@example.test", vec![Role::Customer]);
    s.insert_user(&u).await.unwrap();
    s.insert_refresh_token(&token("r0", u.id, "fam-r", 3600)).await.unwrap();
    // Two devices (or an attacker and the owner) present the same token at once.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { (i, s.rotate_refresh_token("r0", &format!("r1-{i}"), at(3600), at(10)).await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut reused = 0;
    for t in tasks {
        match t.await.unwrap() {
            (i, Ok(RotateOutcome::Rotated { user_id })) => {
                assert_eq!(user_id, u.id);
                winners.push(i);
            }
            (_, Ok(RotateOutcome::Reused)) => reused += 1,
            (_, Ok(RotateOutcome::Invalid)) => {}
            (_, Err(e)) => panic!("concurrent rotation failed: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rotation wins");
    assert!(reused >= 1, "the first replay is reported as reuse");
    // The reuse ended the family, the winner's new token included.
    let new = format!("r1-{}", winners[0]);
    assert_eq!(s.rotate_refresh_token(&new, "r2", at(3600), at(20)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(b.count("refresh_tokens", "family_id = 'fam-r'").await, 2, "one new token issued");
}

pub async fn concurrent_inserts_of_one_email_one_wins(b: &Backend) {
    let s = b.store();
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let s = s.clone();
            let u = user("same@example.test", vec![Role::Customer]);
            tokio::spawn(async move { s.insert_user(&u).await.map(|()| u.id) })
        })
        .collect();
    let mut ok = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(id) => ok.push(id),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok.len(), 1);
    assert_eq!(s.user_by_email("same@example.test").await.unwrap().map(|u| u.id), Some(ok[0]));
    assert_eq!(b.count("users", "1=1").await, 1);
}

/// A token whose secret should never have reached anyone is replaced in its family, and
/// retired as if rotated: should it have reached someone after all, presenting it still ends
/// the family. A used one is not reissued.
pub async fn a_lost_refresh_token_is_reissued_once_and_never_passes_for_reuse(b: &Backend) {
    let s = b.store();
    let u = user("reissue@example.test", vec![Role::Customer]);
    s.insert_user(&u).await.unwrap();
    s.insert_refresh_token(&token("r1", u.id, "fam-r", 3600)).await.unwrap();
    assert_eq!(
        s.rotate_refresh_token("r1", "r2", at(7200), at(10)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    // r2's answer was lost: r3 replaces it in the family.
    assert_eq!(
        s.reissue_refresh_token("r2", "r3", at(7200), at(20)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    assert_eq!(b.count("refresh_tokens", "token_hash = 'r3' AND family_id = 'fam-r'").await, 1);
    assert_eq!(b.count("refresh_tokens", "token_hash = 'r2' AND used_at IS NOT NULL").await, 1);
    // Reissued once only, and refusing it again revokes nothing.
    assert_eq!(s.reissue_refresh_token("r2", "r4", at(7200), at(30)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(
        s.rotate_refresh_token("r3", "r5", at(7200), at(40)).await.unwrap(),
        RotateOutcome::Rotated { user_id: u.id }
    );
    // A used token did reach someone: it is not reissued, and nothing is revoked.
    assert_eq!(s.reissue_refresh_token("r3", "r6", at(7200), at(50)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(b.count("refresh_tokens", "token_hash IN ('r4', 'r6')").await, 0, "no token issued");
    assert_eq!(b.count("refresh_tokens", "family_id = 'fam-r' AND revoked_at IS NOT NULL").await, 0);
    // Nor is an expired or unknown one.
    s.insert_refresh_token(&token("x1", u.id, "fam-x", 100)).await.unwrap();
    assert_eq!(s.reissue_refresh_token("x1", "x2", at(7200), at(100)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(s.reissue_refresh_token("unknown", "x3", at(7200), at(1)).await.unwrap(), RotateOutcome::Invalid);
    assert_eq!(b.count("refresh_tokens", "token_hash IN ('x2', 'x3')").await, 0, "no token issued");
    // The lost r2, presented after all (its answer was sent, not stored): the family ends.
    assert_eq!(s.rotate_refresh_token("r2", "r7", at(7200), at(60)).await.unwrap(), RotateOutcome::Reused);
    assert_eq!(b.count("refresh_tokens", "family_id = 'fam-r' AND revoked_at IS NULL").await, 0, "r5 too");
}
