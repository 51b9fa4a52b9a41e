//! The [`Store`] contract as a test suite (cargo feature `test-util`), run against
//! [`MemoryStore`](super::MemoryStore) and [`RedisStore`](super::RedisStore) in this project's
//! tests, and ready for a store of your own.
//!
//! Each check calls the store the way the layers do and panics, naming the operation and what it
//! expected, when the store breaks the contract written on [`Store`]: replays seen once, rate
//! limits that count, session caps that refuse under any full key and take nothing then, token
//! buckets reserved all-or-nothing (also under concurrency) and settled both ways, stream slots,
//! App Attest keys registered once and their counters raised by compare-and-set (also under
//! concurrency), and the `_now` fast paths agreeing with their slow twins.
//!
//! Keys are made unique per run, so the suite can share a database with other tests. Windows are
//! long (refill during a run is far below one token) and nothing waits on the clock, so it is
//! fast and deterministic on a loaded machine.
//!
//! # Example
//!
//! ```
//! use perishable_core::store::{MemoryStore, conformance};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! conformance::run(&MemoryStore::new()).await;
//! # }
//! ```
//!
//! For a store of your own, in its tests:
//!
//! ```ignore
//! #[tokio::test]
//! async fn my_store_keeps_the_store_contract() {
//!     perishable_core::store::conformance::run(&MyStore::connect("...").await).await;
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    Admission, AppAttestKey, Bucket, CallAdmission, CallDecision, RatePolicy, Reservation, Set,
    Store,
};

/// A window long enough that refill during a run is far below one token.
const LONG_WINDOW: u64 = 10_000_000;

/// Runs every check against `store`, panicking at the first broken promise (the message names
/// the operation and what the contract expected of it).
pub async fn run(store: &dyn Store) {
    ping(store).await;
    sets(store).await;
    rate_limits(store).await;
    session_caps(store).await;
    token_buckets(store).await;
    token_buckets_under_concurrency(store).await;
    stream_slots(store).await;
    call_admissions(store).await;
    app_attest_keys(store).await;
    app_attest_keys_under_concurrency(store).await;
}

/// A prefix no other run uses: the time and a counter.
fn unique(what: &str) -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "conformance-{what}-{nanos:x}-{}",
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn expect<T, E: std::fmt::Display>(result: Result<T, E>, op: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{op} failed: {e}"),
    }
}

/// [`Store::ping`] answers `Ok` for a reachable store.
async fn ping(store: &dyn Store) {
    expect(store.ping().await, "ping");
}

/// [`Store::insert_once`] admits an id once per set, [`Store::contains`] sees it, the sets are
/// apart, and the `_now` fast paths (when a store has them) agree.
async fn sets(store: &dyn Store) {
    let id = unique("id");
    let exp = now() + 600;
    for set in [Set::Revoked, Set::PowUsed, Set::DpopSeen] {
        let name = set.name();
        assert!(
            !expect(store.contains(set, &id).await, "contains"),
            "contains({name}, new id) must be false"
        );
        assert!(
            expect(store.insert_once(set, &id, exp).await, "insert_once"),
            "the first insert_once({name}) of an id must be true"
        );
        assert!(
            !expect(store.insert_once(set, &id, exp).await, "insert_once"),
            "a second insert_once({name}) of the same id must be false: a replay"
        );
        assert!(
            expect(store.contains(set, &id).await, "contains"),
            "contains({name}) must see an inserted id"
        );
        if let Some(seen) = store.contains_now(set, &id) {
            assert!(seen, "contains_now({name}) must agree with contains");
        }
        let other = unique("other");
        if let Some(inserted) = store.insert_once_now(set, &other, exp) {
            assert!(inserted, "insert_once_now({name}) of a new id must be true");
            assert!(
                !expect(store.insert_once(set, &other, exp).await, "insert_once"),
                "insert_once must see what insert_once_now inserted"
            );
        }
    }
    // Each set is its own: an id in one is not in another.
    let lone = unique("lone");
    assert!(expect(
        store.insert_once(Set::PowUsed, &lone, exp).await,
        "insert_once"
    ));
    assert!(
        !expect(store.contains(Set::Revoked, &lone).await, "contains"),
        "an id inserted in one set must not be in another"
    );
    assert!(
        expect(
            store.insert_once(Set::DpopSeen, &lone, exp).await,
            "insert_once"
        ),
        "an id inserted in one set must be new to another"
    );
}

/// A [`RateLimiter`](super::RateLimiter) allows a burst of `points` per key, then refuses with
/// a wait, and keys are apart.
async fn rate_limits(store: &dyn Store) {
    let policy = RatePolicy {
        name: "conformance",
        points: 3,
        window: Duration::from_secs(3600),
        block: Duration::ZERO,
    };
    let limiter = store.rate_limiter(policy.clone());
    assert_eq!(limiter.policy(), &policy, "policy() must return the policy");
    let key = unique("rate");
    for remaining in (0..3).rev() {
        let decision = expect(limiter.check(&key).await, "check");
        assert!(decision.allowed, "request within the burst refused");
        assert_eq!(
            decision.remaining, remaining,
            "remaining after a request within the burst"
        );
    }
    let refused = expect(limiter.check(&key).await, "check");
    assert!(!refused.allowed, "a request past the burst must be refused");
    assert!(
        refused.retry_after > Duration::ZERO,
        "a refusal must say how long to wait"
    );
    if let Some(now) = limiter.check_now(&key) {
        assert!(!now.allowed, "check_now must agree with check");
    }
    let other = expect(limiter.check(&unique("rate")).await, "check");
    assert!(other.allowed, "another key must have its own limit");
}

/// [`Store::admit_session`] holds at most `max` live sessions per key, refuses with a wait when
/// any key is full and then takes nothing, and release and replace move slots.
async fn session_caps(store: &dyn Store) {
    let exp = now() + 600;
    let fp = unique("fp");
    let ip = unique("ip");
    let both = [fp.clone(), ip.clone()];
    let only_ip = [ip.clone()];
    let admit = |keys: &'static str, r: Admission| {
        assert_eq!(r, Admission::Admitted, "admit_session under {keys}");
    };
    admit(
        "a fresh key",
        expect(
            store.admit_session(&both, "s1", exp, 2).await,
            "admit_session",
        ),
    );
    admit(
        "a key with room",
        expect(
            store.admit_session(&both, "s2", exp, 2).await,
            "admit_session",
        ),
    );
    match expect(
        store.admit_session(&both, "s3", exp, 2).await,
        "admit_session",
    ) {
        Admission::Full { retry_after_secs } => assert!(
            (1..=601).contains(&retry_after_secs),
            "retry_after_secs must be when the soonest slot frees (1..=600 here), got {retry_after_secs}"
        ),
        Admission::Admitted => panic!("admit_session past max must be Full"),
    }
    // Refused under a full key, a session takes nothing under the others: a fresh key beside
    // a full one still has its one slot afterwards.
    let fresh = unique("fresh");
    let mixed = [fresh.clone(), fp.clone()];
    assert!(
        matches!(
            expect(
                store.admit_session(&mixed, "s4", exp, 2).await,
                "admit_session"
            ),
            Admission::Full { .. }
        ),
        "a session must be refused when any of its keys is full"
    );
    let fresh_only = [fresh.clone()];
    admit(
        "a key beside a full one, after a refusal",
        expect(
            store.admit_session(&fresh_only, "s5", exp, 1).await,
            "admit_session",
        ),
    );

    // Release frees a slot under every key.
    expect(store.release_session(&both, "s1").await, "release_session");
    admit(
        "a key after a release",
        expect(
            store.admit_session(&both, "s6", exp, 2).await,
            "admit_session",
        ),
    );
    // Replace moves a slot: s2 becomes s7; releasing s2 afterwards frees nothing.
    expect(
        store.replace_session(&both, "s2", "s7", exp).await,
        "replace_session",
    );
    expect(store.release_session(&both, "s2").await, "release_session");
    assert!(
        matches!(
            expect(
                store.admit_session(&only_ip, "s8", exp, 2).await,
                "admit_session"
            ),
            Admission::Full { .. }
        ),
        "a replaced session must still hold its slot (released under its old id: nothing)"
    );
    expect(store.release_session(&both, "s7").await, "release_session");
    admit(
        "a key after the replacement was released",
        expect(
            store.admit_session(&only_ip, "s8", exp, 2).await,
            "admit_session",
        ),
    );
}

/// [`Store::reserve_tokens`] and [`Store::settle_tokens`]: all or nothing across buckets, never
/// above capacity, refunds and debts.
async fn token_buckets(store: &dyn Store) {
    let reserve = |buckets: &'static str, r: Reservation| {
        assert_eq!(r, Reservation::Reserved, "reserve_tokens on {buckets}");
    };
    reserve(
        "no buckets",
        expect(store.reserve_tokens(&[], 1_000).await, "reserve_tokens"),
    );

    let a = [Bucket::new(unique("a"), 100, LONG_WINDOW)];
    reserve(
        "a full bucket",
        expect(store.reserve_tokens(&a, 60).await, "reserve_tokens"),
    );
    match expect(store.reserve_tokens(&a, 60).await, "reserve_tokens") {
        Reservation::Exhausted {
            bucket,
            available,
            retry_after_secs,
        } => {
            assert_eq!(bucket, 0, "the index of the short bucket");
            assert!(
                available <= 40,
                "available after taking 60 of 100: at most 40, got {available}"
            );
            assert!(retry_after_secs >= 1, "retry_after_secs at least 1");
            assert!(
                retry_after_secs <= LONG_WINDOW,
                "retry_after_secs at most the window when amount <= capacity"
            );
        }
        Reservation::Reserved => panic!("reserving 60 of the 40 left must be Exhausted"),
    }
    // A refund gives the tokens back, never above capacity.
    expect(store.settle_tokens(&a, 60).await, "settle_tokens");
    expect(store.settle_tokens(&a, 1_000).await, "settle_tokens");
    reserve(
        "a bucket after a refund",
        expect(store.reserve_tokens(&a, 100).await, "reserve_tokens"),
    );
    assert!(
        matches!(
            expect(store.reserve_tokens(&a, 1).await, "reserve_tokens"),
            Reservation::Exhausted { .. }
        ),
        "a refund must not raise a bucket above its capacity"
    );

    // More than the capacity never passes.
    let b = [Bucket::new(unique("b"), 50, LONG_WINDOW)];
    assert!(
        matches!(
            expect(store.reserve_tokens(&b, 51).await, "reserve_tokens"),
            Reservation::Exhausted { bucket: 0, .. }
        ),
        "an amount above a bucket's capacity must never pass"
    );

    // All or nothing: one short bucket, and nothing is taken from the other.
    let full = Bucket::new(unique("full"), 100, LONG_WINDOW);
    let short = Bucket::new(unique("short"), 100, LONG_WINDOW);
    reserve(
        "one bucket",
        expect(
            store.reserve_tokens(std::slice::from_ref(&short), 90).await,
            "reserve_tokens",
        ),
    );
    let pair = [full.clone(), short.clone()];
    match expect(store.reserve_tokens(&pair, 50).await, "reserve_tokens") {
        Reservation::Exhausted { bucket, .. } => {
            assert_eq!(bucket, 1, "the index must point at the short bucket");
        }
        Reservation::Reserved => panic!("a reservation with a short bucket must be Exhausted"),
    }
    reserve(
        "the other bucket after a refused pair (nothing taken)",
        expect(
            store.reserve_tokens(std::slice::from_ref(&full), 100).await,
            "reserve_tokens",
        ),
    );

    // Usage beyond a reservation is a debt: the bucket holds nothing until it is paid.
    let c = [Bucket::new(unique("c"), 100, LONG_WINDOW)];
    expect(store.settle_tokens(&c, -250).await, "settle_tokens");
    match expect(store.reserve_tokens(&c, 1).await, "reserve_tokens") {
        Reservation::Exhausted { available, .. } => {
            assert_eq!(available, 0, "a bucket in debt holds 0");
        }
        Reservation::Reserved => panic!("a bucket in debt must refuse"),
    }
    expect(store.settle_tokens(&c, 200).await, "settle_tokens");
    assert!(
        matches!(
            expect(store.reserve_tokens(&c, 60).await, "reserve_tokens"),
            Reservation::Exhausted { .. }
        ),
        "a debt of 250 paid back by 200 leaves 50 (the debt counts)"
    );
    reserve(
        "a bucket whose debt was paid",
        expect(store.reserve_tokens(&c, 50).await, "reserve_tokens"),
    );
}

/// Concurrent reservations never both take tokens only one could have.
async fn token_buckets_under_concurrency(store: &dyn Store) {
    let bucket = [Bucket::new(unique("concurrent"), 100, LONG_WINDOW)];
    let calls = (0..40).map(|_| store.reserve_tokens(&bucket, 10));
    let results = futures_util::future::join_all(calls).await;
    let reserved = results
        .into_iter()
        .map(|r| expect(r, "reserve_tokens"))
        .filter(|r| *r == Reservation::Reserved)
        .count();
    assert_eq!(
        reserved, 10,
        "40 concurrent reservations of 10 from a bucket of 100: exactly 10 may pass"
    );
}

/// [`Store::acquire_stream`] holds at most `max` slots per session; release gives one back.
async fn stream_slots(store: &dyn Store) {
    let exp = now() + 600;
    let session = unique("streams");
    for i in 0..2 {
        assert!(
            expect(
                store.acquire_stream(&session, 2, exp).await,
                "acquire_stream"
            ),
            "slot {i} of 2 must be free"
        );
    }
    assert!(
        !expect(
            store.acquire_stream(&session, 2, exp).await,
            "acquire_stream"
        ),
        "a third slot of 2 must be refused"
    );
    assert!(
        expect(
            store.acquire_stream(&unique("streams"), 2, exp).await,
            "acquire_stream"
        ),
        "another session must have its own slots"
    );
    expect(store.release_stream(&session).await, "release_stream");
    assert!(
        expect(
            store.acquire_stream(&session, 2, exp).await,
            "acquire_stream"
        ),
        "a released slot must be free again"
    );
}

/// [`Store::admit_call`] counts the request, then takes the stream slot and the tokens, or
/// neither: a rate refusal takes nothing, a full session takes no tokens, a short bucket takes
/// no slot (the request stays counted), and what it takes is what the separate operations would
/// take.
async fn call_admissions(store: &dyn Store) {
    let limiter = store.rate_limiter(RatePolicy {
        name: "conformance_call",
        points: 3,
        window: Duration::from_secs(3600),
        block: Duration::ZERO,
    });
    let key = unique("call");
    let session = unique("call_streams");
    let exp = now() + 600;
    let bucket = Bucket::new(unique("call_bucket"), 100, LONG_WINDOW);
    let buckets = [bucket.clone()];
    let call = |amount: u64| {
        let mut call = CallAdmission::new();
        call.rate = Some((&*limiter, key.as_str()));
        call.stream = Some((session.as_str(), 1, exp));
        call.buckets = &buckets;
        call.amount = amount;
        call
    };
    // 1st request: admitted, taking the slot and 60 tokens.
    assert_eq!(
        expect(store.admit_call(call(60)).await, "admit_call"),
        CallDecision::Admitted,
        "a call within every limit must be admitted"
    );
    // 2nd: counted, but the only slot is taken: nothing else taken.
    assert_eq!(
        expect(store.admit_call(call(10)).await, "admit_call"),
        CallDecision::StreamsFull,
        "a call past the stream cap must be refused"
    );
    expect(store.release_stream(&session).await, "release_stream");
    // 3rd: counted, slot free, but 50 > 40 tokens left: no slot taken.
    match expect(store.admit_call(call(50)).await, "admit_call") {
        CallDecision::Exhausted {
            bucket: 0,
            available: 40,
            ..
        } => {}
        other => {
            panic!("a call past the budget must be Exhausted at bucket 0 with 40 left: {other:?}")
        }
    }
    assert!(
        expect(
            store.acquire_stream(&session, 1, exp).await,
            "acquire_stream"
        ),
        "a call refused for its tokens must not keep the stream slot"
    );
    expect(store.release_stream(&session).await, "release_stream");
    // 4th request: over the rate limit of 3: refused, nothing taken.
    match expect(store.admit_call(call(10)).await, "admit_call") {
        CallDecision::RateLimited(decision) => {
            assert!(!decision.allowed, "a rate refusal must not be allowed");
            assert!(decision.retry_after > Duration::ZERO, "and must say when");
        }
        other => panic!("the 4th request of 3 must be rate limited: {other:?}"),
    }
    match expect(store.reserve_tokens(&buckets, 41).await, "reserve_tokens") {
        Reservation::Exhausted { available: 40, .. } => {}
        other => panic!("refused calls must take no tokens (40 left expected): {other:?}"),
    }
    // A DPoP proof's replay id is recorded first: the second time, a replay, nothing taken.
    let proof = unique("call_proof");
    let mut first = CallAdmission::new();
    first.replay = Some((proof.as_str(), exp));
    assert_eq!(
        expect(store.admit_call(first).await, "admit_call"),
        CallDecision::Admitted,
        "a fresh proof must be admitted"
    );
    let mut again = CallAdmission::new();
    again.replay = Some((proof.as_str(), exp));
    again.buckets = &buckets;
    again.amount = 1;
    assert_eq!(
        expect(store.admit_call(again).await, "admit_call"),
        CallDecision::Replayed,
        "a proof seen before must be refused as a replay"
    );
    assert!(
        !expect(
            store.insert_once(Set::DpopSeen, &proof, exp).await,
            "insert_once"
        ),
        "admit_call must record the proof where insert_once looks"
    );
    // Without a rate limiter or a slot, it is a reservation.
    let mut plain = CallAdmission::new();
    plain.buckets = &buckets;
    plain.amount = 40;
    assert_eq!(
        expect(store.admit_call(plain).await, "admit_call"),
        CallDecision::Admitted
    );
    match expect(store.reserve_tokens(&buckets, 1).await, "reserve_tokens") {
        Reservation::Exhausted { available: 0, .. } => {}
        other => panic!("the plain admission must have taken 40: {other:?}"),
    }
}

/// [`Store::register_app_attest_key`] registers a key id once (first writer wins, the record
/// unchanged), [`Store::app_attest_key`] reads back what was written, and
/// [`Store::advance_app_attest_counter`] raises the counter only when strictly above.
async fn app_attest_keys(store: &dyn Store) {
    let exp = now() + 600;
    let id = unique("aakey");
    let key = AppAttestKey::new(
        (0..65u8).collect::<Vec<u8>>(),
        "ABCDE12345.com.example.app",
        false,
        0,
        now(),
    );
    assert_eq!(
        expect(store.app_attest_key(&id).await, "app_attest_key"),
        None,
        "app_attest_key of an unknown id must be None"
    );
    assert!(
        !expect(
            store.advance_app_attest_counter(&id, 1, exp).await,
            "advance_app_attest_counter"
        ),
        "advance_app_attest_counter of an unknown id must be false"
    );
    assert_eq!(
        expect(store.app_attest_key(&id).await, "app_attest_key"),
        None,
        "advance_app_attest_counter must not create a key"
    );
    assert!(
        expect(
            store.register_app_attest_key(&id, &key, exp).await,
            "register_app_attest_key"
        ),
        "the first registration of an id must be true"
    );
    assert_eq!(
        expect(store.app_attest_key(&id).await, "app_attest_key"),
        Some(key.clone()),
        "app_attest_key must return the record as registered (every byte of the public key)"
    );
    let usurper = AppAttestKey::new(vec![4; 65], "ZZZZZ99999.com.evil.app", true, 0, now());
    assert!(
        !expect(
            store.register_app_attest_key(&id, &usurper, exp).await,
            "register_app_attest_key"
        ),
        "a second registration of an id must be false: first writer wins"
    );
    assert_eq!(
        expect(store.app_attest_key(&id).await, "app_attest_key"),
        Some(key.clone()),
        "a refused registration must leave the record unchanged"
    );

    let advance = |counter: u32| store.advance_app_attest_counter(&id, counter, exp);
    assert!(
        !expect(advance(0).await, "advance_app_attest_counter"),
        "raising the counter to its own value (0) must be false"
    );
    assert!(
        expect(advance(1).await, "advance_app_attest_counter"),
        "raising the counter from 0 to 1 must be true"
    );
    assert!(
        !expect(advance(1).await, "advance_app_attest_counter"),
        "raising the counter to 1 twice must be false the second time: a replay"
    );
    assert!(
        expect(advance(41).await, "advance_app_attest_counter"),
        "a jump (1 to 41) is an increase"
    );
    assert!(
        !expect(advance(40).await, "advance_app_attest_counter"),
        "a lower counter (40 after 41) must be false"
    );
    assert!(
        expect(advance(u32::MAX).await, "advance_app_attest_counter"),
        "the counter goes up to u32::MAX"
    );
    let stored = expect(store.app_attest_key(&id).await, "app_attest_key");
    assert_eq!(
        stored.as_ref().map(|k| k.counter),
        Some(u32::MAX),
        "app_attest_key must show the raised counter"
    );
    assert_eq!(
        stored.map(|k| (k.public_key, k.app_id, k.development, k.created_at)),
        Some((key.public_key, key.app_id, key.development, key.created_at)),
        "raising the counter must change nothing else"
    );
    let development = AppAttestKey::new(vec![4; 65], "ABCDE12345.com.example.app", true, 0, 7);
    let other = unique("aakey");
    assert!(expect(
        store
            .register_app_attest_key(&other, &development, exp)
            .await,
        "register_app_attest_key"
    ));
    assert_eq!(
        expect(store.app_attest_key(&other).await, "app_attest_key"),
        Some(development),
        "another id is another key (with its development flag)"
    );
}

/// Concurrent registrations of one id: exactly one wins, and its record is the one kept.
/// Concurrent raises to the same counter: exactly one wins.
async fn app_attest_keys_under_concurrency(store: &dyn Store) {
    let exp = now() + 600;
    let id = unique("aakey-concurrent");
    let keys: Vec<AppAttestKey> = (0..20u8)
        .map(|i| AppAttestKey::new(vec![i; 65], "ABCDE12345.com.example.app", false, 0, 1))
        .collect();
    let calls = keys
        .iter()
        .map(|key| store.register_app_attest_key(&id, key, exp));
    let results = futures_util::future::join_all(calls).await;
    let winners: Vec<usize> = results
        .into_iter()
        .map(|r| expect(r, "register_app_attest_key"))
        .enumerate()
        .filter_map(|(i, won)| won.then_some(i))
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "20 concurrent registrations of one id: exactly one may pass"
    );
    assert_eq!(
        expect(store.app_attest_key(&id).await, "app_attest_key").as_ref(),
        keys.get(winners[0]),
        "the record kept must be the winner's"
    );

    let calls = (0..20).map(|_| store.advance_app_attest_counter(&id, 5, exp));
    let raised = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| expect(r, "advance_app_attest_counter"))
        .filter(|raised| *raised)
        .count();
    assert_eq!(
        raised, 1,
        "20 concurrent raises of one key to the same counter: exactly one may pass"
    );
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_memory_store_keeps_the_contract() {
        super::run(&super::super::MemoryStore::new()).await;
    }
}
