//! Deterministic simulation of the failover protocol: thousands of random
//! schedules of crashes, partitions between any pair of the three parties,
//! message delays, clock drift, restarts and switchovers, checking after
//! every step that the two sites never both may release output, and that a
//! permanent primary failure hands the VM to the backup in bounded time.

mod sim;

use std::time::Duration;

use failover::{Event, Stance, Timers};
use sim::{Rng, World, A, B, W};

const PARTIES: [failover::SiteId; 3] = [A, B, W];

fn schedules() -> u64 {
    std::env::var("FAILOVER_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Applies random faults for `span`, then heals everything.
fn chaos(w: &mut World, span: Duration) -> Result<(), String> {
    let end = w.now + span;
    while w.now < end {
        let step = w.rng().ms(50, 3000);
        let at = (w.now + step).min(end);
        w.run_until(at)?;
        let r = w.rng().below(100);
        let p = PARTIES[w.rng().below(3) as usize];
        let q = PARTIES[w.rng().below(3) as usize];
        match r {
            0..=24 if p != q => {
                let up = w.link_up(p, q);
                w.set_link(p, q, !up);
            }
            25..=34 => w.crash(p),
            35..=59 => w.restart(p),
            60..=64 => {
                let from = if w.stance(A) == Some(Stance::Active) {
                    A
                } else {
                    B
                };
                let after = w.rng().ms(10, 400);
                w.start_switchover(from, after);
            }
            65..=74 => {
                // Message delays swing between LAN-like and bad-WAN-like.
                w.max_delay = w.rng().ms(2, 400);
            }
            _ => {}
        }
    }
    Ok(())
}

fn heal(w: &mut World) {
    for (p, q) in [(A, B), (A, W), (B, W)] {
        w.set_link(p, q, true);
    }
    for p in PARTIES {
        w.restart(p);
    }
    w.max_delay = Duration::from_millis(60);
}

#[test]
fn never_two_sites_release_output_under_random_schedules() {
    let timers = Timers::default();
    let mut promotions = 0;
    let mut fences = 0;
    for seed in 0..schedules() {
        let mut w = World::new(seed, timers);
        let result = chaos(&mut w, Duration::from_secs(40)).and_then(|_| {
            heal(&mut w);
            w.run_until(w.now + Duration::from_secs(20))
        });
        if let Err(e) = result {
            panic!("seed {seed}: {e}");
        }
        promotions += w
            .log
            .iter()
            .filter(|h| matches!(h.event, Event::Promote { .. }))
            .count();
        fences += w
            .log
            .iter()
            .filter(|h| matches!(h.event, Event::Fence))
            .count();
        // Once healed, the system settles: exactly one site runs the VM
        // and may release output (liveness after repair).
        let active: Vec<_> = [A, B].into_iter().filter(|p| w.releasing(*p)).collect();
        assert!(
            active.len() == 1
                || w.stance(A) != Some(Stance::Active) && w.stance(B) != Some(Stance::Active),
            "seed {seed}: after healing, releasing sites = {active:?}\n{}",
            w.trace_tail(30)
        );
    }
    // The schedules must actually exercise takeovers and fencing.
    assert!(
        promotions > 100,
        "only {promotions} promotions: schedules too tame"
    );
    assert!(fences > 100, "only {fences} fences: schedules too tame");
}

#[test]
fn permanent_primary_failure_hands_over_within_detection_plus_activation() {
    let timers = Timers::default();
    let mut worst = Duration::ZERO;
    for seed in 0..schedules() / 4 {
        let mut w = World::new(seed, timers);
        let max_delay = w.max_delay;
        // Let B resynchronise and the lease settle, then kill A for good.
        let warm = Duration::from_secs(5) + w.rng().ms(0, 2000);
        w.run_until(warm).expect("safe");
        assert!(
            w.releasing(A),
            "seed {seed}: primary not running after warm-up"
        );
        assert!(
            w.site(B).is_some_and(|s| s.replica_ready()),
            "seed {seed}: backup never resynced"
        );
        let crash_at = w.now;
        w.crash(A);
        w.run_until(crash_at + Duration::from_secs(10))
            .expect("safe");
        let promoted = w
            .promoted(B, crash_at)
            .unwrap_or_else(|| panic!("seed {seed}: backup never promoted\n{}", w.trace_tail(30)));
        let took = promoted - crash_at;
        // Detection timeout, then one request round trip (one renewal
        // period more if the witness still saw the dead primary's lease).
        let bound = timers.detection_timeout + timers.renew_interval + 2 * max_delay;
        assert!(
            took <= bound,
            "seed {seed}: takeover took {took:?} > {bound:?}"
        );
        worst = worst.max(took);
        assert!(
            w.releasing(B) || w.run_until(w.now + Duration::from_secs(1)).is_ok() && w.releasing(B)
        );
    }
    println!(
        "worst simulated takeover: {worst:?} (detection timeout {:?})",
        timers.detection_timeout
    );
}

#[test]
fn rng_is_deterministic() {
    let (mut a, mut b) = (Rng::new(7), Rng::new(7));
    for _ in 0..100 {
        assert_eq!(a.next(), b.next());
    }
}
