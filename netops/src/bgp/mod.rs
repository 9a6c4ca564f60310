//! BGP: messages on the wire, RFC 7606 UPDATE decoding, the sans-IO session
//! FSM, and the tokio speaker that runs sessions to several peers.

pub mod fuzzing;
pub mod md5;
pub mod route;
pub mod session;
pub mod speaker;
pub mod update;
pub mod wire;

pub use route::{parse_community, parse_large_community, Route, RouteAttributes};
pub use session::{Action, ConnId, PeerMode, Session, SessionConfig, SessionStatus, State};
pub use speaker::{
    PeerConfig, PeerStatus, Speaker, SpeakerConfig, SpeakerError, SpeakerStatus, StaleFencingToken,
};
