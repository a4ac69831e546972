//! The rules of a gateway as the limits phase reads them: what a rule counts ([`Measure`]), per
//! what ([`LimitKey`]), over which period (a sliding or fixed window, or a budget's calendar
//! [`BudgetPeriod`]), and the global `[limits]` options.

use std::sync::Arc;
use std::time::Duration;

use aigate_store::Technique;
use serde::Deserialize;

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Requests.
    Requests,
    /// Input plus output tokens.
    Tokens,
    /// Cost in USD.
    CostUsd,
}

impl Measure {
    /// The value as the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Requests => "requests",
            Measure::Tokens => "tokens",
            Measure::CostUsd => "cost_usd",
        }
    }
}

/// What a rule counts per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The whole gateway.
    Gateway,
    /// Each client credential (provider key or gateway token), by digest.
    Credential,
    /// Each requested model.
    Model,
    /// Each value of a `cf-aig-metadata` entry; requests without it are not counted by the rule.
    Metadata(String),
}

impl std::str::FromStr for LimitKey {
    type Err = String;
    fn from_str(s: &str) -> Result<LimitKey, String> {
        match s.trim() {
            "gateway" => Ok(LimitKey::Gateway),
            "credential" => Ok(LimitKey::Credential),
            "model" => Ok(LimitKey::Model),
            other => match other.strip_prefix("metadata.") {
                Some(k) if !k.is_empty() => Ok(LimitKey::Metadata(k.to_owned())),
                _ => Err(format!(
                    "unknown key {other:?}: expected \"gateway\", \"credential\", \"model\" or \"metadata.NAME\""
                )),
            },
        }
    }
}

impl std::fmt::Display for LimitKey {
    /// As the configuration writes it (`key = "metadata.user_id"`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::Gateway => f.write_str("gateway"),
            LimitKey::Credential => f.write_str("credential"),
            LimitKey::Model => f.write_str("model"),
            LimitKey::Metadata(k) => write!(f, "metadata.{k}"),
        }
    }
}

/// The period of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// UTC hour.
    Hour,
    /// UTC day.
    Day,
    /// UTC week, from Monday.
    Week,
    /// UTC calendar month.
    Month,
    /// Any window of this many ms ending now.
    Rolling(u64),
}

impl std::str::FromStr for BudgetPeriod {
    type Err = String;
    fn from_str(s: &str) -> Result<BudgetPeriod, String> {
        match s.trim() {
            "hour" => Ok(BudgetPeriod::Hour),
            "day" => Ok(BudgetPeriod::Day),
            "week" => Ok(BudgetPeriod::Week),
            "month" => Ok(BudgetPeriod::Month),
            other => humantime::parse_duration(other)
                .ok()
                .filter(|d| !d.is_zero())
                .map(|d| BudgetPeriod::Rolling(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
                .ok_or_else(|| {
                    format!("invalid period {other:?}: hour, day, week, month, or a rolling duration like \"24h\"")
                }),
        }
    }
}

impl BudgetPeriod {
    /// The calendar window holding `now_ms`: (start, end); `None` for rolling periods.
    pub fn window(self, now_ms: u64) -> Option<(u64, u64)> {
        const H: u64 = 3_600_000;
        const D: u64 = 24 * H;
        let day = now_ms / D;
        match self {
            BudgetPeriod::Hour => Some((now_ms / H * H, now_ms / H * H + H)),
            BudgetPeriod::Day => Some((day * D, day * D + D)),
            BudgetPeriod::Week => {
                // 1970-01-01 was a Thursday: Monday-based weekday = (days + 3) % 7.
                let start = day - (day + 3) % 7;
                Some((start * D, (start + 7) * D))
            }
            BudgetPeriod::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some((days_from_civil(y, m, 1) * D, days_from_civil(ny, nm, 1) * D))
            }
            BudgetPeriod::Rolling(_) => None,
        }
    }

    /// As the configuration writes it (`hour`, …, or a duration like `24h`).
    pub fn label(self) -> String {
        match self {
            BudgetPeriod::Hour => "hour".into(),
            BudgetPeriod::Day => "day".into(),
            BudgetPeriod::Week => "week".into(),
            BudgetPeriod::Month => "month".into(),
            BudgetPeriod::Rolling(ms) => humantime::format_duration(Duration::from_millis(ms)).to_string(),
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm; no date crate
/// is needed for this one conversion).
fn days_from_civil(y: i64, m: u32, d: u32) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).unwrap_or(0)
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(days: u64) -> (i64, u32, u32) {
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A budget's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Its period.
    pub period: BudgetPeriod,
    /// Alert thresholds, fractions of the limit.
    pub alerts: Vec<f64>,
    /// The limit in USD (for messages).
    pub limit_usd: f64,
}

/// One rule of a gateway (a rate limit or a budget).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Name, unique in the gateway (in 429 messages, metrics and keys).
    pub name: Arc<str>,
    /// What it counts per.
    pub key: LimitKey,
    /// What it counts.
    pub measure: Measure,
    /// Limit in units of the measure (micro-USD for cost).
    pub limit: u64,
    /// Window length, ms (for calendar budgets: the longest window, used for expiry).
    pub period_ms: u64,
    /// Fixed or sliding.
    pub technique: Technique,
    /// Only requests for this model (as requested).
    pub model: Option<String>,
    /// Set for budgets.
    pub budget: Option<Budget>,
}

/// What happens when the limit store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Let requests through (default).
    #[default]
    Allow,
    /// Refuse them with 503.
    Deny,
}

impl OnStoreError {
    /// The value as the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// Global limit options (`[limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitOptions {
    /// Behaviour when the store fails.
    pub on_store_error: OnStoreError,
    /// Whether cache hits count against request rules.
    pub count_cache_hits: bool,
    /// Where budget alerts are POSTed.
    pub alert_webhook: Option<http::Uri>,
    /// Output tokens assumed for a request without `max_tokens`.
    pub default_max_tokens: u64,
}

impl Default for LimitOptions {
    fn default() -> Self {
        LimitOptions {
            on_store_error: OnStoreError::Allow,
            count_cache_hits: false,
            alert_webhook: None,
            default_max_tokens: 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows() {
        // 2026-11-26T08:41:00Z, a Thursday.
        let now = 1_795_682_460_000;
        let (s, e) = BudgetPeriod::Day.window(now).unwrap();
        assert_eq!((s, e), (1_795_651_200_000, 1_795_737_600_000));
        let (s, e) = BudgetPeriod::Week.window(now).unwrap();
        // Monday 2026-11-23 to Monday 2026-11-30.
        assert_eq!((s, e), (1_795_392_000_000, 1_795_996_800_000));
        let (s, e) = BudgetPeriod::Month.window(now).unwrap();
        // 2026-11-01 to 2026-12-01.
        assert_eq!((s, e), (1_793_491_200_000, 1_796_083_200_000));
        // December rolls into the next year.
        let (s, e) = BudgetPeriod::Month.window(1_796_083_200_000 + 5).unwrap();
        assert_eq!((s, e), (1_796_083_200_000, 1_798_761_600_000));
        assert_eq!(BudgetPeriod::Rolling(1).window(now), None);
        for d in [0u64, 59, 365, 10_957, 20_000, 20_418, 100_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn parse_keys_and_periods() {
        assert_eq!("metadata.user".parse::<LimitKey>().unwrap(), LimitKey::Metadata("user".into()));
        assert!("metadata.".parse::<LimitKey>().is_err());
        assert!("bogus".parse::<LimitKey>().is_err());
        assert_eq!("24h".parse::<BudgetPeriod>().unwrap(), BudgetPeriod::Rolling(86_400_000));
        assert!("0s".parse::<BudgetPeriod>().is_err());
    }
}
