//! Heartbeats, failure detection, witness arbitration and leases, and the
//! failover / fencing / switchover state machine. See DESIGN.md.
