//! Wall-clock time in Unix milliseconds, with an offset tests can move forward (cache expiry is
//! then tested without sleeping): the stores' clock, shared with them.

pub use aigate_store::Clock;
