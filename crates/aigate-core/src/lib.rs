//! aigate-core: the request path of the aigate AI gateway.
//!
//! A request arrives at the [`server`], which hands it to the [`service`]: aigate's own routes
//! (health, metrics, [`admin`]) are answered there, every other request runs through the
//! [`phases`] in order: route → authenticate → read body → cache lookup → limits → upstream →
//! respond. What the phases share lives in [`state`]; the machinery they use has its own modules:
//! the response [`cache`], rate [`limits`] and budgets, the upstream HTTP [`client`], the
//! [`providers`] table, what a request is ([`endpoint`]), and the [`meter`] that measures every
//! request (usage, cost) and hands it to the [`logs`] pipeline, which also feeds the OpenTelemetry
//! export ([`telemetry`]). [`config`] turns the TOML file
//! into validated [`config::Settings`]. See `docs/architecture.md`.

pub mod admin;
pub mod body;
pub mod cache;
pub mod client;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod endpoint;
pub mod error;
pub mod headers;
pub mod limits;
pub mod logs;
pub mod meter;
pub mod metrics;
pub mod phases;
pub mod providers;
pub mod report;
pub mod routing;
pub mod server;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod translate;

pub use config::Settings;
pub use error::GatewayError;
pub use server::{start, start_on, ServerHandle};
