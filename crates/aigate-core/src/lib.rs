//! aigate-core: the request path of the aigate AI gateway.
//!
//! Modules are named after the stages of the request path, in the order a request meets them
//! (see `docs/architecture.md`): [`routing`] → [`auth`] → body limit ([`proxy`]) → [`cache`] →
//! [`upstream`] → stream back ([`body`], teed by [`cache::tee`] on a miss). [`proxy`] strings the stages together; [`server`] accepts connections
//! and drains them at shutdown; [`config`] turns the TOML file into validated [`config::Settings`].

pub mod admin;
pub mod auth;
pub mod body;
pub mod cache;
pub mod clock;
pub mod config;
pub mod cost;
pub mod error;
pub mod headers;
pub mod limits;
pub mod logs;
pub mod meter;
pub mod metrics;
pub mod providers;
pub mod proxy;
pub mod report;
pub mod routing;
pub mod server;
pub mod upstream;
pub mod usage;

pub use config::Settings;
pub use error::GatewayError;
pub use server::{start, start_on, ServerHandle};
