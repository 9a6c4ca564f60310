//! The witness's rules, message by message (sans-IO, no network): a grant
//! is answered only once its record is durable, a failed write changes
//! nothing, only a VM's two sites may hold its lease, a started witness
//! gives no lease away for one lease period and never grants a token below
//! one a site reported.

use std::time::{Duration, Instant};

use failover::{LeaseRecord, Message, SiteId, Timers, Witness, WitnessOutput};

const A: SiteId = SiteId(1);
const B: SiteId = SiteId(2);
const C: SiteId = SiteId(3);
const VM: &str = "web1";

fn timers() -> Timers {
    Timers::default()
}

fn parties() -> Vec<(String, [SiteId; 2])> {
    vec![(VM.to_owned(), [A, B]), ("db1".to_owned(), [B, C])]
}

fn ask(req: u64, token: u64) -> Message {
    Message::LeaseRequest { req, token }
}

fn record(holder: SiteId, token: u64) -> LeaseRecord {
    LeaseRecord {
        holder: Some(holder),
        token,
    }
}

fn persist(vm: &str, r: LeaseRecord) -> Vec<WitnessOutput> {
    vec![WitnessOutput::Persist {
        vm: vm.to_owned(),
        record: r,
    }]
}

fn grant(to: SiteId, req: u64, token: u64) -> WitnessOutput {
    WitnessOutput::Send {
        to,
        msg: Message::LeaseReply {
            req,
            granted: Some(timers().lease),
            token,
            holder: Some(to),
        },
    }
}

fn refusal(to: SiteId, req: u64, token: u64, holder: Option<SiteId>) -> WitnessOutput {
    WitnessOutput::Send {
        to,
        msg: Message::LeaseReply {
            req,
            granted: None,
            token,
            holder,
        },
    }
}

/// After the lease of a holder that stopped renewing has run out.
fn lapsed(t: Instant) -> Instant {
    t + timers().lease + timers().clock_margin + Duration::from_millis(1)
}

/// A witness where A holds web1's lease under token 1.
fn a_holds(t: Instant) -> Witness {
    let mut w = Witness::new(timers(), parties());
    assert_eq!(w.handle(VM, A, ask(1, 0), t), persist(VM, record(A, 1)));
    assert_eq!(w.persisted(VM, true, t), vec![grant(A, 1, 1)]);
    w
}

#[test]
fn a_grant_is_answered_only_once_its_record_is_durable() {
    let t = Instant::now();
    let mut w = Witness::new(timers(), parties());
    // The only output is the record to write; nothing changed yet.
    assert_eq!(w.handle(VM, A, ask(1, 0), t), persist(VM, record(A, 1)));
    assert_eq!(
        w.record(VM),
        Some(LeaseRecord {
            holder: None,
            token: 0
        })
    );
    let later = t + Duration::from_millis(30);
    assert_eq!(w.persisted(VM, true, later), vec![grant(A, 1, 1)]);
    assert_eq!(w.record(VM), Some(record(A, 1)));
    // A renewal changes no record: answered at once.
    assert_eq!(w.handle(VM, A, ask(2, 1), later), vec![grant(A, 2, 1)]);
    // The lease ran from the confirmation: B is refused until then.
    let still = later + timers().lease + timers().clock_margin - Duration::from_millis(1);
    assert_eq!(
        w.handle(VM, B, ask(1, 0), still),
        vec![refusal(B, 1, 1, Some(A))]
    );
}

#[test]
fn a_failed_write_changes_nothing_and_the_retry_is_a_new_grant() {
    let t = Instant::now();
    let mut w = a_holds(t);
    let t = lapsed(t);
    assert_eq!(w.handle(VM, B, ask(1, 1), t), persist(VM, record(B, 2)));
    assert_eq!(w.persisted(VM, false, t), vec![]);
    assert_eq!(
        w.record(VM),
        Some(record(A, 1)),
        "the record stays as it was"
    );
    // B's retry is not taken for a renewal: the record is written again.
    assert_eq!(w.handle(VM, B, ask(2, 1), t), persist(VM, record(B, 2)));
    assert_eq!(w.persisted(VM, false, t), vec![]);
    assert_eq!(w.handle(VM, B, ask(3, 1), t), persist(VM, record(B, 2)));
    assert_eq!(w.persisted(VM, true, t), vec![grant(B, 3, 2)]);
    assert_eq!(w.record(VM), Some(record(B, 2)));
    // The old holder learns the newer token.
    assert_eq!(
        w.handle(VM, A, ask(9, 1), t),
        vec![refusal(A, 9, 2, Some(B))]
    );
}

#[test]
fn after_a_failed_write_even_a_renewal_rewrites_the_record_first() {
    // The failed write may have reached the file (B, 2): renewing A from
    // memory would leave a file that names B, which a restarted witness
    // would then grant to B while A's renewed lease runs.
    let t = Instant::now();
    let mut w = a_holds(t);
    let t = lapsed(t);
    assert_eq!(w.handle(VM, B, ask(1, 1), t), persist(VM, record(B, 2)));
    assert_eq!(w.persisted(VM, false, t), vec![]);
    assert_eq!(w.handle(VM, A, ask(5, 1), t), persist(VM, record(A, 1)));
    // Still failing: no renewal.
    assert_eq!(w.persisted(VM, false, t), vec![]);
    // Refusals grant nothing: answered at once even now.
    assert_eq!(w.handle(VM, C, ask(1, 0), t), vec![refusal(C, 1, 0, None)]);
    assert_eq!(w.handle(VM, A, ask(6, 1), t), persist(VM, record(A, 1)));
    assert_eq!(w.persisted(VM, true, t), vec![grant(A, 6, 1)]);
    // Sure again: renewals need no write.
    assert_eq!(w.handle(VM, A, ask(7, 1), t), vec![grant(A, 7, 1)]);
}

#[test]
fn messages_about_a_vm_whose_record_is_being_written_are_dropped() {
    let t = Instant::now();
    let mut w = Witness::new(timers(), parties());
    assert_eq!(w.handle(VM, A, ask(1, 0), t), persist(VM, record(A, 1)));
    assert_eq!(w.handle(VM, B, ask(1, 0), t), vec![]);
    assert_eq!(w.handle(VM, A, ask(2, 0), t), vec![]);
    // Another VM is not held up.
    assert_eq!(
        w.handle("db1", B, ask(1, 0), t),
        persist("db1", record(B, 1))
    );
    assert_eq!(w.persisted(VM, true, t), vec![grant(A, 1, 1)]);
    assert_eq!(w.persisted("db1", true, t), vec![grant(B, 1, 1)]);
    // A report with nothing pending is ignored.
    assert_eq!(w.persisted(VM, true, t), vec![]);
}

#[test]
fn only_the_vms_two_sites_may_hold_its_lease() {
    let t = Instant::now();
    let mut w = Witness::new(timers(), parties());
    // C is a site of db1, not of web1; the lease is free, still refused.
    assert_eq!(w.handle(VM, C, ask(1, 0), t), vec![refusal(C, 1, 0, None)]);
    assert_eq!(w.handle(VM, C, ask(2, 7), t), vec![refusal(C, 2, 0, None)]);
    // A VM the witness does not know.
    assert_eq!(
        w.handle("mail", A, ask(3, 0), t),
        vec![refusal(A, 3, 0, None)]
    );
    assert_eq!(w.record("mail"), None);
    // A token reported by an outsider is no floor.
    assert_eq!(w.handle(VM, A, ask(1, 0), t), persist(VM, record(A, 1)));
    assert_eq!(w.persisted(VM, true, t), vec![grant(A, 1, 1)]);
    // Nor may the holder hand the lease to an outsider.
    let handover = Message::Handover {
        req: 2,
        token: 1,
        to: C,
    };
    assert_eq!(
        w.handle(VM, A, handover, t),
        vec![refusal(A, 2, 1, Some(A))]
    );
    assert_eq!(w.record(VM), Some(record(A, 1)));
}

#[test]
fn a_handover_is_announced_to_both_sites_once_durable() {
    let t = Instant::now();
    let mut w = a_holds(t);
    let handover = Message::Handover {
        req: 2,
        token: 1,
        to: B,
    };
    assert_eq!(
        w.handle(VM, A, handover.clone(), t),
        persist(VM, record(B, 2))
    );
    assert_eq!(w.persisted(VM, false, t), vec![]);
    assert_eq!(w.record(VM), Some(record(A, 1)));
    assert_eq!(
        w.handle(VM, A, handover.clone(), t),
        persist(VM, record(B, 2))
    );
    let to_b = WitnessOutput::Send {
        to: B,
        msg: Message::LeaseReply {
            req: 0,
            granted: Some(Duration::ZERO),
            token: 2,
            holder: Some(B),
        },
    };
    assert_eq!(
        w.persisted(VM, true, t),
        vec![to_b.clone(), refusal(A, 2, 2, Some(B))]
    );
    // A repeat (the reply to A was lost) tells both again, writing nothing.
    assert_eq!(
        w.handle(VM, A, handover, t),
        vec![to_b, refusal(A, 2, 2, Some(B))]
    );
}

#[test]
fn a_started_witness_gives_no_lease_away_for_one_lease_period() {
    let t = Instant::now();
    let mut w = Witness::recover(timers(), parties(), 10, [(VM.to_owned(), record(A, 12))], t);
    let quarantine = timers().lease + timers().clock_margin;
    let inside = t + quarantine - Duration::from_millis(1);
    // The recorded holder renews at once; the other site waits.
    assert_eq!(w.handle(VM, A, ask(1, 12), t), vec![grant(A, 1, 12)]);
    // db1 has no record: its lease may be held under a lost state, so
    // nobody gets it before a lease period has passed.
    // The refusal names token 0: nothing was ever granted under the floor,
    // and a site that hears a higher token than its own demotes.
    assert_eq!(
        w.handle("db1", B, ask(1, 0), inside),
        vec![refusal(B, 1, 0, None)]
    );
    let after = t + quarantine;
    // Tokens start above the state's floor.
    assert_eq!(
        w.handle("db1", C, ask(1, 0), after),
        persist("db1", record(C, 11))
    );
}

#[test]
fn a_new_grant_exceeds_every_token_a_site_reported() {
    // A witness re-initialised after losing its file, with no floor to go
    // by (worst case): the sites' reports are the floor.
    let t = Instant::now();
    let mut w = Witness::recover(timers(), parties(), 0, [], t);
    assert_eq!(
        w.handle(VM, B, ask(1, 9), t),
        vec![refusal(B, 1, 0, None)],
        "nothing granted during the first lease period"
    );
    let t = t + timers().lease + timers().clock_margin;
    assert_eq!(w.handle(VM, A, ask(1, 7), t), persist(VM, record(A, 10)));
    assert_eq!(w.persisted(VM, true, t), vec![grant(A, 1, 10)]);
}
