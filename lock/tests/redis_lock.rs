//! Integration tests against a private `redis-server` per test.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RedisServer, lock_client, lock_client_for, redis_client, test_timing, with_timeout};
use fred::prelude::*;
use hearth_lock::{Acquire, HolderId, LockError, LockGuard, LossReason, lock_key};
use tokio::time::{Instant, sleep, timeout};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn expect_acquired(result: Acquire) -> LockGuard {
    match result {
        Acquire::Acquired(guard) => guard,
        Acquire::HeldBy(holder) => panic!("expected to acquire, held by {holder}"),
    }
}

fn expect_held_by(result: Acquire) -> HolderId {
    match result {
        Acquire::HeldBy(holder) => holder,
        Acquire::Acquired(guard) => panic!("expected contention, acquired {guard:?}"),
    }
}

async fn get(admin: &Client, key: &str) -> Option<String> {
    admin.get(key).await.unwrap()
}

async fn pttl(admin: &Client, key: &str) -> i64 {
    admin.pttl(key).await.unwrap()
}

/// Loss reasons the observer saw, after giving a concurrent `on_lost` call time to finish.
async fn observed_losses(rec: &common::Recorder) -> Vec<LossReason> {
    sleep(ms(20)).await;
    rec.losses()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_reports_the_first_holder() {
    with_timeout(async {
        let redis = RedisServer::start();
        let (a, _) = lock_client(redis.port(), "node-a").await;
        let (b, _) = lock_client(redis.port(), "node-b").await;

        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        assert!(guard.is_valid());
        assert_eq!(guard.resource(), "doc");
        assert_eq!(guard.holder(), a.holder_id());
        assert_eq!(guard.key(), lock_key("test", "doc"));

        let holder = expect_held_by(b.try_acquire("doc").await.unwrap());
        assert_eq!(&holder, a.holder_id());
        assert_eq!(holder.node_id(), "node-a");

        // The holder itself is told it already holds the resource.
        assert_eq!(
            &expect_held_by(a.try_acquire("doc").await.unwrap()),
            a.holder_id()
        );
        assert_eq!(b.holder("doc").await.unwrap().as_ref(), Some(a.holder_id()));
        assert_eq!(b.holder("other").await.unwrap(), None);

        // A different resource is independent.
        let other = expect_acquired(b.try_acquire("other").await.unwrap());
        assert!(other.is_valid() && guard.is_valid());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_the_lease_past_its_ttl() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, rec) = lock_client(redis.port(), "node-a").await;
        let (b, _) = lock_client(redis.port(), "node-b").await;
        let ttl = test_timing().ttl();

        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let value = get(&admin, guard.key()).await.expect("key exists");
        assert!(value.starts_with(&format!("{}|", a.holder_id())), "{value}");
        let initial_pttl = pttl(&admin, guard.key()).await;
        assert!(initial_pttl > 0 && initial_pttl <= 900, "{initial_pttl}");

        sleep(ttl * 3).await;

        assert!(guard.is_valid(), "{:?}", guard.loss_reason());
        assert_eq!(
            get(&admin, guard.key()).await.as_deref(),
            Some(value.as_str())
        );
        assert!(pttl(&admin, guard.key()).await > 0);
        assert_eq!(
            &expect_held_by(b.try_acquire("doc").await.unwrap()),
            a.holder_id()
        );
        let refreshes = rec.refreshes_ok();
        assert!(
            (6..=11).contains(&refreshes),
            "{refreshes} refreshes in 3 ttl"
        );
        let remaining = guard.remaining_validity().expect("valid");
        assert!(remaining <= test_timing().validity(), "{remaining:?}");
        assert!(rec.losses().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_deletes_only_its_own_key() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, _) = lock_client(redis.port(), "node-a").await;
        let (b, _) = lock_client(redis.port(), "node-b").await;

        // Our own key is deleted and the resource is free again.
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let status = guard.status();
        let key = guard.key().to_owned();
        assert!(guard.release().await.unwrap());
        assert_eq!(get(&admin, &key).await, None);
        assert!(!status.is_valid());
        assert_eq!(status.loss_reason(), Some(LossReason::Released));
        assert_eq!(b.holder("doc").await.unwrap(), None);

        // A key overwritten by someone else is never deleted (nor given a TTL).
        let guard = expect_acquired(b.try_acquire("doc").await.unwrap());
        let foreign = "node-z|zzzz|00000000000000ff";
        let _: () = admin.set(&key, foreign, None, None, false).await.unwrap();
        assert!(!guard.release().await.unwrap());
        assert_eq!(get(&admin, &key).await.as_deref(), Some(foreign));
        assert_eq!(pttl(&admin, &key).await, -1);

        // Releasing after the key is gone reports false.
        let _: i64 = admin.del(&key).await.unwrap();
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let _: i64 = admin.del(&key).await.unwrap();
        assert!(!guard.release().await.unwrap());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_holder_does_not_own_the_old_lease() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let old = HolderId::from_parts("node-a", "0000000000000001").unwrap();
        let (before, _) = lock_client_for(redis.port(), old.clone()).await;
        let guard = expect_acquired(before.try_acquire("doc").await.unwrap());
        let key = guard.key().to_owned();
        // "Crash": the refresh loop stops, the key stays until it expires.
        drop(guard);
        drop(before);

        let (after, _) = lock_client(redis.port(), "node-a").await;
        assert_eq!(after.holder_id().node_id(), "node-a");
        assert_ne!(after.holder_id(), &old);
        let holder = expect_held_by(after.try_acquire("doc").await.unwrap());
        assert_eq!(holder, old);
        assert_ne!(&holder, after.holder_id());
        assert!(get(&admin, &key).await.is_some());

        // Once the old lease expires, the new incarnation acquires normally.
        sleep(test_timing().ttl() + ms(100)).await;
        let guard = expect_acquired(after.try_acquire("doc").await.unwrap());
        assert_eq!(guard.holder(), after.holder_id());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_is_taken_over_at_once_and_nobody_elses() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let dead = HolderId::from_parts("node-a", "0000000000000001").unwrap();
        let (before, _) = lock_client_for(redis.port(), dead.clone()).await;
        let guard = expect_acquired(before.try_acquire("doc").await.unwrap());
        let key = guard.key().to_owned();
        // "Crash": the refresh loop stops, the key stays until it expires.
        drop(guard);
        drop(before);

        let (b, rec_b) = lock_client(redis.port(), "node-b").await;
        let (c, _) = lock_client(redis.port(), "node-c").await;
        // naming a holder that does not hold it changes nothing
        let wrong = HolderId::from_parts("node-a", "0000000000000002").unwrap();
        assert_eq!(
            expect_held_by(b.try_take_over("doc", &wrong).await.unwrap()),
            dead
        );
        let started = Instant::now();
        let taken = expect_acquired(b.try_take_over("doc", &dead).await.unwrap());
        assert!(
            started.elapsed() < test_timing().ttl() / 2,
            "no waiting for the expiry"
        );
        assert!(taken.is_valid());
        assert_eq!(taken.holder(), b.holder_id());
        assert!(get(&admin, &key).await.unwrap().starts_with("node-b|"));
        assert!(pttl(&admin, &key).await > 0, "the new lease has a TTL");
        // the old holder's name no longer takes anything: the lease is b's now
        assert_eq!(
            &expect_held_by(c.try_take_over("doc", &dead).await.unwrap()),
            b.holder_id()
        );
        // and b's lease is refreshed like any other
        sleep(test_timing().ttl() + ms(100)).await;
        assert!(taken.is_valid());
        assert!(observed_losses(&rec_b).await.is_empty());
        // a key that expired meanwhile is simply acquired
        assert!(taken.release().await.unwrap());
        let again = expect_acquired(c.try_take_over("doc", &dead).await.unwrap());
        assert_eq!(again.holder(), c.holder_id());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_key_is_detected_within_a_refresh_interval() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, rec) = lock_client(redis.port(), "node-a").await;
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let status = guard.status();
        let mut rx = guard.subscribe_lost();
        assert!(!*rx.borrow());

        sleep(ms(100)).await;
        let _: i64 = admin.del(guard.key()).await.unwrap();
        let deleted_at = Instant::now();

        let reason = timeout(test_timing().ttl(), guard.lost())
            .await
            .expect("loss detected");
        let detected = deleted_at.elapsed();
        assert_eq!(reason, LossReason::Missing);
        assert!(
            detected <= test_timing().refresh_every() + ms(150),
            "detected after {detected:?}"
        );
        assert!(!guard.is_valid());
        assert!(!status.is_valid());
        assert!(matches!(
            guard.check(),
            Err(LockError::Lost(LossReason::Missing))
        ));
        assert_eq!(guard.remaining_validity(), None);
        timeout(ms(100), rx.wait_for(|lost| *lost))
            .await
            .expect("watch fired")
            .expect("channel open");
        assert_eq!(observed_losses(&rec).await, vec![LossReason::Missing]);

        // The refresh path never re-creates the key.
        sleep(test_timing().refresh_every() * 3).await;
        assert_eq!(get(&admin, guard.key()).await, None);
        assert!(!guard.release().await.unwrap());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwriting_the_key_is_detected_and_the_intruder_is_left_alone() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, rec) = lock_client(redis.port(), "node-a").await;
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let key = guard.key().to_owned();

        let foreign = "node-b|bbbbbbbbbbbbbbbb|0000000000000002";
        let _: () = admin.set(&key, foreign, None, None, false).await.unwrap();
        let written_at = Instant::now();

        let reason = timeout(test_timing().ttl(), guard.lost())
            .await
            .expect("loss detected");
        assert!(written_at.elapsed() <= test_timing().refresh_every() + ms(150));
        assert_eq!(
            reason,
            LossReason::Taken {
                by: foreign.to_owned()
            }
        );
        assert!(!guard.is_valid());
        assert_eq!(observed_losses(&rec).await.len(), 1);

        // Neither the refresh nor the release touched the foreign key.
        assert_eq!(pttl(&admin, &key).await, -1);
        assert!(!guard.release().await.unwrap());
        assert_eq!(get(&admin, &key).await.as_deref(), Some(foreign));
        assert_eq!(
            a.holder("doc").await.unwrap(),
            Some(HolderId::from_parts("node-b", "bbbbbbbbbbbbbbbb").unwrap())
        );
    })
    .await;
}

/// Waits until the guard is lost, then checks the loss happened at the validity deadline
/// measured from the send time of the last successful refresh.
async fn assert_expires_at_deadline(guard: &LockGuard, rec: &common::Recorder) {
    let validity = test_timing().validity();
    let reason = timeout(validity + ms(500), guard.lost())
        .await
        .expect("loss detected");
    let lost_at = Instant::now();
    assert_eq!(reason, LossReason::Expired);
    assert!(!guard.is_valid());
    assert!(matches!(
        guard.check(),
        Err(LockError::Lost(LossReason::Expired))
    ));

    let last_sent = rec
        .last_ok_refresh_sent()
        .expect("at least one refresh succeeded before the outage");
    let deadline = last_sent + validity;
    // `last_sent` is computed a little late (observer call time − latency), hence the slack.
    assert!(
        lost_at + ms(20) >= deadline,
        "lost {:?} before the deadline",
        deadline - lost_at
    );
    assert!(
        lost_at <= deadline + ms(150),
        "lost {:?} after the deadline",
        lost_at - deadline
    );
    assert_eq!(observed_losses(rec).await, vec![LossReason::Expired]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_expires_the_lease_on_the_monotonic_deadline() {
    with_timeout(async {
        let redis = RedisServer::start();
        let (a, rec) = lock_client(redis.port(), "node-a").await;
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let mut rx = guard.subscribe_lost();

        // Let at least one refresh succeed, then freeze Redis.
        sleep(test_timing().refresh_every() + ms(100)).await;
        assert!(rec.refreshes_ok() >= 1);
        redis.pause();
        let paused_at = Instant::now();
        assert!(guard.is_valid());

        assert_expires_at_deadline(&guard, &rec).await;
        assert!(paused_at.elapsed() <= test_timing().validity() + ms(150));
        assert!(*rx.borrow_and_update());
        redis.resume();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_expires_the_lease_on_the_monotonic_deadline() {
    with_timeout(async {
        let mut redis = RedisServer::start();
        let (a, rec) = lock_client(redis.port(), "node-a").await;
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());

        sleep(test_timing().refresh_every() + ms(100)).await;
        redis.kill();
        assert!(guard.is_valid());
        assert_expires_at_deadline(&guard, &rec).await;

        // Acquire attempts while Redis is down fail within the validity window.
        let started = Instant::now();
        let result = a.try_acquire("other").await;
        assert!(
            matches!(result, Err(LockError::Timeout { .. } | LockError::Redis(_))),
            "{result:?}"
        );
        assert!(started.elapsed() <= test_timing().validity() + ms(150));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_data_loses_the_lease_and_never_recreates_it() {
    with_timeout(async {
        let mut redis = RedisServer::start();
        let (a, _) = lock_client(redis.port(), "node-a").await;
        let (b, _) = lock_client(redis.port(), "node-b").await;
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let key = guard.key().to_owned();

        sleep(ms(100)).await;
        redis.restart();

        let reason = timeout(test_timing().ttl() + ms(500), guard.lost())
            .await
            .expect("loss detected");
        assert!(
            matches!(reason, LossReason::Missing | LossReason::Expired),
            "{reason:?}"
        );
        assert!(!guard.is_valid());

        // The old holder's refresh loop never wrote the key back.
        let admin = redis_client(redis.port()).await;
        sleep(test_timing().refresh_every() * 3).await;
        assert_eq!(get(&admin, &key).await, None);

        // Anyone can acquire again, and the old guard stays invalid.
        let newer = expect_acquired(b.try_acquire("doc").await.unwrap());
        assert!(newer.is_valid());
        assert!(!guard.is_valid());
        assert_eq!(b.holder("doc").await.unwrap().as_ref(), Some(b.holder_id()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_guard_stops_refreshing() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, rec) = lock_client(redis.port(), "node-a").await;
        let guard = expect_acquired(a.try_acquire("doc").await.unwrap());
        let key = guard.key().to_owned();
        let status = guard.status();
        let mut rx = guard.subscribe_lost();

        sleep(test_timing().refresh_every() + ms(100)).await;
        drop(guard);
        let refreshes = rec.refreshes_ok();
        assert!(refreshes >= 1);
        assert!(get(&admin, &key).await.is_some(), "drop does not delete");
        assert!(!status.is_valid());
        assert_eq!(status.loss_reason(), Some(LossReason::Released));
        assert!(*rx.borrow_and_update());
        assert_eq!(status.lost().await, LossReason::Released);

        sleep(test_timing().ttl() + ms(100)).await;
        assert_eq!(get(&admin, &key).await, None, "the key expired");
        assert_eq!(rec.refreshes_ok(), refreshes, "no refresh after drop");
        assert!(rec.losses().is_empty(), "a drop is not reported as a loss");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_names_map_to_independent_keys() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, _) = lock_client(redis.port(), "node-a").await;
        let names = ["a", "a:lock", "{a}", "a*", "a\0b", "}", "test:lock:{a}"];

        let mut guards = Vec::new();
        for name in names {
            guards.push(expect_acquired(a.try_acquire(name).await.unwrap()));
        }
        let mut keys: Vec<&str> = guards.iter().map(LockGuard::key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), names.len());
        for (name, guard) in names.iter().zip(&guards) {
            assert_eq!(guard.resource(), *name);
            assert!(get(&admin, guard.key()).await.is_some());
            assert_eq!(a.holder(name).await.unwrap().as_ref(), Some(a.holder_id()));
        }

        // Releasing one leaves the others alone.
        let first = guards.remove(0);
        assert!(first.release().await.unwrap());
        assert_eq!(a.holder("a").await.unwrap(), None);
        for guard in &guards {
            assert!(guard.is_valid());
            assert!(get(&admin, guard.key()).await.is_some());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_reported_not_parsed() {
    with_timeout(async {
        let redis = RedisServer::start();
        let admin = redis_client(redis.port()).await;
        let (a, _) = lock_client(redis.port(), "node-a").await;
        let key = a.key_for("doc");
        let _: () = admin.set(&key, "garbage", None, None, false).await.unwrap();

        assert!(matches!(
            a.holder("doc").await,
            Err(LockError::MalformedValue { .. })
        ));
        assert!(matches!(
            a.try_acquire("doc").await,
            Err(LockError::MalformedValue { .. })
        ));
        assert_eq!(get(&admin, &key).await.as_deref(), Some("garbage"));
    })
    .await;
}
