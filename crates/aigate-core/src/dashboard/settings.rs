//! The settings page's data: a gateway's cache, log and rate-limit settings, changed live and
//! written back to the configuration file with its comments and layout kept (`toml_edit`), and
//! the audit log of every change made from the dashboard.
//!
//! A change is applied the way a reload is: the edited file is validated as a whole
//! ([`Settings::from_file_text`]), written (to a temporary file, then renamed over the old one),
//! and handed to [`AppState::reload`]. An invalid change leaves both the file and the running
//! settings untouched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml_edit::{DocumentMut, Item, Table, TableLike, Value};

use crate::config::{CacheMode, Gateway, Settings};
use crate::error::GatewayError;
use crate::state::AppState;

/// The audit log's file, under `data_dir`.
const AUDIT_FILE: &str = "dashboard-audit.jsonl";
/// Size at which the audit log is rotated (the previous file is kept as `.1`).
const AUDIT_MAX_BYTES: u64 = 1_000_000;
/// Entries of the audit log shown on the settings page.
const AUDIT_SHOWN: usize = 50;

/// What the settings page shows of a gateway.
#[derive(Serialize, Debug)]
pub struct SettingsView {
    gateway: String,
    /// Whether Save is offered.
    editable: bool,
    /// Why not, when it is not.
    read_only_reason: Option<String>,
    config_path: Option<String>,
    #[serde(flatten)]
    values: Values,
    audit: Vec<AuditEntry>,
}

/// The settings the page can change, as the running configuration has them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Values {
    /// `on`, `shadow` or `off`.
    pub cache_mode: String,
    /// Cache TTL, e.g. `1h`.
    pub cache_ttl: String,
    /// A log record per request.
    pub logs_enabled: bool,
    /// Records keep the request and response bodies.
    pub log_bodies: bool,
    /// The gateway's rate limit (`[gateways.NAME.rate_limit]`), if any.
    pub rate_limit: Option<RateLimit>,
}

/// `[gateways.NAME.rate_limit]`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per period.
    pub limit: u64,
    /// The period, e.g. `60s`.
    pub period: String,
    /// `sliding` or `fixed`.
    pub technique: String,
}

/// One change made from the dashboard.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AuditEntry {
    /// When, Unix ms.
    pub at_ms: u64,
    /// The gateway changed.
    pub gateway: String,
    /// What was done (`cache.mode`, `cache purge`, `logs delete`).
    pub action: String,
    /// The value before, when a setting changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The value after, or what was done.
    pub to: String,
    /// The dashboard session that did it (the first 8 characters of its id).
    pub by: String,
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Values {
    fn of(gateway: &Gateway) -> Values {
        let rate_limit = gateway.rules.iter().find(|r| &*r.name == "rate_limit").map(|r| RateLimit {
            limit: r.limit,
            period: fmt_duration(Duration::from_millis(r.period_ms)),
            technique: r.technique.as_str().to_owned(),
        });
        Values {
            cache_mode: gateway.cache.mode.as_str().to_owned(),
            cache_ttl: fmt_duration(gateway.cache.ttl),
            logs_enabled: gateway.logs.enabled,
            log_bodies: gateway.logs.bodies,
            rate_limit,
        }
    }
}

/// Why the settings of this process cannot be changed from the dashboard, if they cannot.
fn read_only_reason(settings: &Settings) -> Option<String> {
    if settings.dashboard.read_only {
        return Some("[dashboard] read_only = true: change the configuration file and reload instead".into());
    }
    let Some(path) = &settings.source else {
        return Some(
            "aigate runs the embedded default configuration: start it with --config FILE to change settings here"
                .into(),
        );
    };
    match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(_) => None,
        Err(e) => Some(format!("the configuration file {} is not writable: {e}", path.display())),
    }
}

/// `GET .../settings`.
pub async fn view(state: &AppState, gateway: &Gateway) -> Result<SettingsView, GatewayError> {
    let settings = state.settings.load_full();
    let gw = gateway.name.to_string();
    let data_dir = settings.data_dir.clone();
    let (reason, audit) = blocking({
        let settings = settings.clone();
        let gw = gw.clone();
        move || Ok((read_only_reason(&settings), read_audit(&data_dir, &gw)))
    })
    .await?;
    Ok(SettingsView {
        gateway: gw,
        editable: reason.is_none(),
        read_only_reason: reason,
        config_path: settings.source.as_ref().map(|p| p.display().to_string()),
        values: Values::of(gateway),
        audit,
    })
}

/// `PUT .../settings`: applies the values that differ from the running ones, live and in the
/// file. Answers the new view and any reload warnings.
pub async fn save(
    state: &AppState,
    gateway: &Gateway,
    wanted: Values,
    by: &str,
) -> Result<(SettingsView, Vec<String>), GatewayError> {
    let _one_at_a_time = state.dashboard.save_lock.lock().await;
    let settings = state.settings.load_full();
    let current = Values::of(gateway);
    let gw = gateway.name.to_string();
    let now = state.clock.now_ms();
    let by = by.to_owned();
    let data_dir = settings.data_dir.clone();
    let (new_settings, changes) = blocking(move || {
        if let Some(reason) = read_only_reason(&settings) {
            return Err(GatewayError::Conflict(format!("settings are read-only: {reason}")));
        }
        let path = settings.source.clone().ok_or(GatewayError::Internal)?;
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        let mut doc: DocumentMut =
            text.parse().map_err(|e| GatewayError::Conflict(format!("{}: cannot be edited: {e}", path.display())))?;
        let changes = edit(&mut doc, &gw, &current, &wanted)?;
        if changes.is_empty() {
            return Ok((None, changes));
        }
        let new_text = doc.to_string();
        let new_settings =
            Settings::from_file_text(&path, &new_text).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
        write_atomically(&path, new_text.as_bytes()).map_err(|e| io_error(&path, e))?;
        let entries: Vec<AuditEntry> = changes
            .iter()
            .map(|(action, from, to)| AuditEntry {
                at_ms: now,
                gateway: gw.clone(),
                action: action.clone(),
                from: Some(from.clone()),
                to: to.clone(),
                by: by.clone(),
            })
            .collect();
        if let Err(e) = append_audit(&data_dir, &entries) {
            tracing::warn!("dashboard audit log: {e}");
        }
        Ok((Some(new_settings), changes))
    })
    .await?;
    let mut warnings = Vec::new();
    if let Some(new_settings) = new_settings {
        warnings = state.reload(new_settings);
        for (action, from, to) in &changes {
            tracing::info!(gateway = &*gateway.name, "dashboard: {action} changed from {from} to {to}");
        }
    }
    let settings = state.settings.load_full();
    let gateway = settings.gateways.get(&*gateway.name).ok_or(GatewayError::Internal)?;
    Ok((view(state, gateway).await?, warnings))
}

/// Records an action done from the dashboard (a purge, a log deletion).
pub async fn audit(state: &AppState, gateway: &str, action: &str, to: String, by: &str) {
    let entry = AuditEntry {
        at_ms: state.clock.now_ms(),
        gateway: gateway.to_owned(),
        action: action.to_owned(),
        from: None,
        to,
        by: by.to_owned(),
    };
    let data_dir = state.settings.load().data_dir.clone();
    let r =
        blocking(move || append_audit(&data_dir, &[entry]).map_err(|e| io_error(&data_dir.join(AUDIT_FILE), e))).await;
    if let Err(e) = r {
        tracing::warn!("dashboard audit log: {e}");
    }
}

/// Applies the differences between `current` and `wanted` to the document; answers each change
/// as (setting, from, to).
fn edit(
    doc: &mut DocumentMut,
    gw: &str,
    current: &Values,
    wanted: &Values,
) -> Result<Vec<(String, String, String)>, GatewayError> {
    let mut changes = Vec::new();
    let mode = match wanted.cache_mode.as_str() {
        "on" => CacheMode::On,
        "shadow" => CacheMode::Shadow,
        "off" => CacheMode::Off,
        other => return Err(GatewayError::BadRequest(format!("cache_mode: {other:?} is not on, shadow or off"))),
    };
    if wanted.cache_mode != current.cache_mode {
        let cache = section(doc, gw, "cache")?;
        if mode != CacheMode::Off {
            set(cache, "enabled", true.into());
        }
        set(cache, "mode", mode.as_str().into());
        changes.push(("cache.mode".into(), current.cache_mode.clone(), wanted.cache_mode.clone()));
    }
    if wanted.cache_ttl.trim() != current.cache_ttl {
        let ttl = wanted.cache_ttl.trim();
        humantime::parse_duration(ttl).map_err(|_| {
            GatewayError::BadRequest(format!("cache_ttl: {ttl:?} is not a duration like \"1h\" or \"30m\""))
        })?;
        set(section(doc, gw, "cache")?, "ttl", ttl.into());
        changes.push(("cache.ttl".into(), current.cache_ttl.clone(), ttl.to_owned()));
    }
    if wanted.logs_enabled != current.logs_enabled {
        set(section(doc, gw, "logs")?, "enabled", wanted.logs_enabled.into());
        changes.push(("logs.enabled".into(), current.logs_enabled.to_string(), wanted.logs_enabled.to_string()));
    }
    if wanted.log_bodies != current.log_bodies {
        set(section(doc, gw, "logs")?, "bodies", wanted.log_bodies.into());
        changes.push(("logs.bodies".into(), current.log_bodies.to_string(), wanted.log_bodies.to_string()));
    }
    if wanted.rate_limit != current.rate_limit {
        let describe = |r: &Option<RateLimit>| match r {
            Some(r) => format!("{} per {} ({})", r.limit, r.period, r.technique),
            None => "none".to_owned(),
        };
        match &wanted.rate_limit {
            Some(rl) => {
                if !matches!(rl.technique.as_str(), "sliding" | "fixed") {
                    return Err(GatewayError::BadRequest(format!(
                        "rate_limit.technique: {:?} is not sliding or fixed",
                        rl.technique
                    )));
                }
                let limit = i64::try_from(rl.limit)
                    .map_err(|_| GatewayError::BadRequest("rate_limit.limit: too large".into()))?;
                let t = section(doc, gw, "rate_limit")?;
                set(t, "limit", limit.into());
                set(t, "period", rl.period.trim().into());
                set(t, "technique", rl.technique.as_str().into());
            }
            None => {
                gateway_table(doc, gw)?.remove("rate_limit");
            }
        }
        changes.push(("rate_limit".into(), describe(&current.rate_limit), describe(&wanted.rate_limit)));
    }
    Ok(changes)
}

/// `[gateways.GW]`, created when the file does not have it yet.
fn gateway_table<'a>(doc: &'a mut DocumentMut, gw: &str) -> Result<&'a mut dyn TableLike, GatewayError> {
    let not_a_table = |what: &str| GatewayError::Conflict(format!("{what} in the configuration file is not a table"));
    let gateways = doc
        .entry("gateways")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_like_mut()
        .ok_or_else(|| not_a_table("gateways"))?;
    gateways
        .entry(gw)
        .or_insert(Item::Table(Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| not_a_table(&format!("gateways.{gw}")))
}

/// `[gateways.GW.NAME]`, created when missing.
fn section<'a>(doc: &'a mut DocumentMut, gw: &str, name: &str) -> Result<&'a mut dyn TableLike, GatewayError> {
    gateway_table(doc, gw)?
        .entry(name)
        .or_insert(Item::Table(Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| GatewayError::Conflict(format!("gateways.{gw}.{name} in the configuration file is not a table")))
}

/// Sets `key` keeping the old value's surrounding whitespace and trailing comment.
fn set(table: &mut dyn TableLike, key: &str, mut value: Value) {
    if let Some(old) = table.get(key).and_then(Item::as_value) {
        *value.decor_mut() = old.decor().clone();
    }
    table.insert(key, Item::Value(value));
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so a crash
/// leaves the old file or the new one, never half of one. Keeps the file's permissions.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let target = std::fs::canonicalize(path)?;
    let perms = std::fs::metadata(&target)?.permissions();
    let mut tmp = target.clone().into_os_string();
    tmp.push(".aigate-tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, perms)?;
    std::fs::rename(&tmp, &target)
}

fn append_audit(data_dir: &Path, entries: &[AuditEntry]) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join(AUDIT_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > AUDIT_MAX_BYTES) {
        std::fs::rename(&path, data_dir.join(format!("{AUDIT_FILE}.1")))?;
    }
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, e).map_err(std::io::Error::other)?;
        out.push(b'\n');
    }
    std::fs::OpenOptions::new().create(true).append(true).open(&path)?.write_all(&out)
}

/// The newest entries of the gateway, newest first.
fn read_audit(data_dir: &Path, gw: &str) -> Vec<AuditEntry> {
    let Ok(text) = std::fs::read_to_string(data_dir.join(AUDIT_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<AuditEntry>(l).ok())
        .filter(|e| e.gateway == gw)
        .take(AUDIT_SHOWN)
        .collect()
}

fn io_error(path: &Path, e: std::io::Error) -> GatewayError {
    GatewayError::Conflict(format!("{}: {e}", path.display()))
}

/// Runs file work on the blocking pool, off the request runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GatewayError> + Send + 'static,
) -> Result<T, GatewayError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| GatewayError::Internal)?
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# the team's gateway
listen = "127.0.0.1:0"

[gateways.prod]                 # production
[gateways.prod.cache]
enabled = true
mode = "on"                     # on | shadow | off
ttl = "1h"                      # keep an hour
"#;

    fn values() -> Values {
        Values {
            cache_mode: "on".into(),
            cache_ttl: "1h".into(),
            logs_enabled: true,
            log_bodies: false,
            rate_limit: None,
        }
    }

    fn edited(wanted: Values) -> (String, Vec<(String, String, String)>) {
        let mut doc: DocumentMut = FILE.parse().unwrap_or_else(|e| panic!("{e}"));
        let changes = edit(&mut doc, "prod", &values(), &wanted).unwrap_or_else(|e| panic!("{e}"));
        (doc.to_string(), changes)
    }

    #[test]
    fn a_change_keeps_comments_and_layout() {
        let (text, changes) = edited(Values { cache_mode: "off".into(), cache_ttl: "2h".into(), ..values() });
        assert_eq!(changes.len(), 2);
        // Each value keeps what followed it on its line (spacing and comment).
        assert!(text.contains(&format!("mode = \"off\"{:21}# on | shadow | off", "")), "{text}");
        assert!(text.contains(&format!("ttl = \"2h\"{:22}# keep an hour", "")), "{text}");
        assert!(text.starts_with("# the team's gateway\n"), "{text}");
        assert!(text.contains("[gateways.prod]                 # production"), "{text}");
    }

    #[test]
    fn sections_are_added_and_removed() {
        let rl = RateLimit { limit: 10, period: "60s".into(), technique: "fixed".into() };
        let (text, _) = edited(Values { log_bodies: true, rate_limit: Some(rl), ..values() });
        let doc: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(doc["gateways"]["prod"]["logs"]["bodies"].as_bool(), Some(true));
        assert_eq!(doc["gateways"]["prod"]["rate_limit"]["limit"].as_integer(), Some(10));
        let mut doc: DocumentMut = text.parse().unwrap_or_else(|e| panic!("{e}"));
        let with = Values {
            log_bodies: true,
            rate_limit: Some(RateLimit { limit: 10, period: "60s".into(), technique: "fixed".into() }),
            ..values()
        };
        let changes =
            edit(&mut doc, "prod", &with, &Values { log_bodies: true, ..values() }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(changes, vec![("rate_limit".into(), "10 per 60s (fixed)".into(), "none".into())]);
        assert!(!doc.to_string().contains("rate_limit"));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let mut doc: DocumentMut = FILE.parse().unwrap_or_else(|e| panic!("{e}"));
        for (wanted, field) in [
            (Values { cache_mode: "sometimes".into(), ..values() }, "cache_mode"),
            (Values { cache_ttl: "soon".into(), ..values() }, "cache_ttl"),
        ] {
            let e = edit(&mut doc, "prod", &values(), &wanted).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with(field), "{e}");
        }
    }
}
