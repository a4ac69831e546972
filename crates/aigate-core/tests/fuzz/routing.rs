//! Routing targets: paths and segments, upstream URIs, `cf-aig-*` headers, the Universal
//! Endpoint and dynamic routes.

use super::*;

fn parse_uri(s: &str) -> Option<Uri> {
    s.parse::<Uri>().ok().filter(|u| u.path().starts_with('/'))
}

pub(super) fn check_route(settings: &Settings, method: &Method, uri: &Uri, h: &HeaderMap) -> Result<(), TestCaseError> {
    match route::route(settings, method, uri, h) {
        Ok(r) => {
            within_base(&r.provider, &r.upstream).map_err(TestCaseError::fail)?;
            prop_assert!(settings.providers.contains_key(&r.provider.name));
            let _ = Endpoint::classify(&r.provider.name, method, r.rest);
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

/// The route of a Universal request on the `prod` gateway.
fn universal_base(uri: &Uri) -> Route<'_> {
    let r = route::route(&SETTINGS, &Method::POST, uri, &HeaderMap::new()).unwrap();
    assert_eq!(r.compat, Compat::Universal);
    r
}

static UNIVERSAL_URI: LazyLock<Uri> = LazyLock::new(|| Uri::from_static("/v1/acct/prod"));

fn check_step(base: &Route<'_>, provider: &str, endpoint: &str) -> Result<(), TestCaseError> {
    match route::for_step(&SETTINGS, base, provider, endpoint) {
        Ok(r) => {
            within_base(&r.provider, &r.upstream)
                .map_err(|e| TestCaseError::fail(format!("step {provider:?} {endpoint:?}: {e}")))?;
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1))]

    /// Any path, method and headers: a route or an error, never an upstream outside the base URL.
    #[test]
    fn route_any_path(path in path_and_query(), method in method(), h in header_map(), account in any::<bool>()) {
        timed("route", || {
            let Some(uri) = parse_uri(&path) else { return Ok(()) };
            check_route(if account { &SETTINGS_ACCOUNT } else { &SETTINGS }, &method, &uri, &h)
        })?;
    }

    /// Any printable path, not only router-shaped ones.
    #[test]
    fn route_any_text(path in "/[!-~]{0,60}", method in method()) {
        timed("route_text", || {
            let Some(uri) = parse_uri(&path) else { return Ok(()) };
            check_route(&SETTINGS, &method, &uri, &HeaderMap::new())
        })?;
    }

    /// A segment `check_segment` accepts cannot move up or sideways once decoded.
    #[test]
    fn segment_check(seg in prop_oneof![3 => "[.%2eEfFcC5\\\\a]{0,9}", 1 => "[^/]{0,12}"]) {
        timed("check_segment", || {
            match check_segment(&seg) {
                Ok(()) => safe_segment(&seg).map_err(TestCaseError::fail),
                Err(e) => { prop_assert!(!e.to_string().is_empty()); Ok(()) }
            }
        })?;
    }

    /// Upstream URIs of every provider for any path, account and query.
    #[test]
    fn upstream_uri_any(rest in segments(6), account in proptest::option::of(segment()), query in proptest::option::of("[a-z0-9=&%./?#-]{0,10}")) {
        timed("upstream_uri", || {
            for p in SETTINGS.providers.values() {
                if let Ok(u) = p.upstream_uri(account.as_deref(), &rest, query.as_deref()) {
                    within_base(p, &u).map_err(|e| TestCaseError::fail(format!("{}: {rest:?} {account:?}: {e}", p.name)))?;
                }
            }
            Ok(())
        })?;
    }

    /// The `cf-aig-*` header parsers: an error names the header; an accepted value is in bounds.
    #[test]
    fn cf_aig_headers(h in header_map()) {
        timed("headers", || {
            let gw = SETTINGS.gateways.get("prod").unwrap();
            match CacheOptions::parse(&h) {
                Ok(o) => {
                    if let Some(ttl) = o.ttl {
                        prop_assert!(ttl.is_zero() || (Duration::from_secs(60)..=aigate_core::cache::MAX_TTL).contains(&ttl));
                    }
                    if let Some(k) = &o.custom_key {
                        prop_assert!(!k.is_empty() && k.len() <= 1024);
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("cache") || e.to_string().contains("skip"), "{e}"),
            }
            match retry_policy(&h, gw) {
                Ok(r) => {
                    prop_assert!((1..=5).contains(&r.max_attempts));
                    prop_assert!(r.delay <= Duration::from_millis(5000));
                    for n in 0..8 { prop_assert!(r.wait(n) <= Duration::from_secs(5)); }
                }
                Err(e) => prop_assert!(e.to_string().contains("cf-aig-"), "{e}"),
            }
            match request_timeout(&h, gw) {
                Ok(t) => prop_assert!(!t.is_zero()),
                Err(e) => prop_assert!(e.to_string().contains("cf-aig-request-timeout"), "{e}"),
            }
            if let Some(v) = h.get(headers::CF_AIG_METADATA) {
                if let Some(md) = parse_metadata(v.as_bytes()) {
                    prop_assert!(md.len() <= aigate_store::MAX_METADATA);
                }
            }
            if let Some(v) = h.get(headers::CF_AIG_CUSTOM_COST) {
                check_custom_cost(v.as_bytes())?;
            }
            // The meter reads the event id, metadata, custom cost and the collect-log flags.
            let uri = Uri::from_static("/prod/openai/chat/completions");
            let r = route::route(&SETTINGS, &Method::POST, &uri, &h).unwrap();
            let m = Meter::new(uuid::Uuid::nil(), 0, Instant::now(), &r, &h);
            let is_false = |n: &HeaderName| h.get(n).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false"));
            prop_assert_eq!(m.collect_log, !is_false(&headers::CF_AIG_COLLECT_LOG));
            prop_assert_eq!(m.collect_payload, !is_false(&headers::CF_AIG_COLLECT_LOG_PAYLOAD));
            prop_assert_eq!(m.event_id.is_some(), h.contains_key(headers::CF_AIG_EVENT_ID));
            let _ = aigate_core::phases::authenticate::check(gw, &h);
            let _ = Canary::choose(&SETTINGS, gw, &h);
            let mut md = routing::Metadata::of(&h);
            let _ = (md.get("user"), md.get("tier"));
            for sticky in [None, Some(routing::Sticky::Credential), Some(routing::Sticky::Metadata("user".into()))] {
                let x = routing::draw(sticky.as_ref(), "salt", &h, &mut routing::Metadata::of(&h));
                prop_assert!((0.0..1.0).contains(&x), "{x}");
            }
            Ok(())
        })?;
    }

    /// `cf-aig-metadata`: Some exactly for a JSON object, at most MAX_METADATA scalar entries.
    #[test]
    fn metadata(v in prop_oneof![json_value().prop_map(|v| v.to_string().into_bytes()), proptest::collection::vec(any::<u8>(), 0..64)]) {
        timed("metadata", || {
            let parsed = parse_metadata(&v);
            let object = matches!(serde_json::from_slice::<Value>(&v), Ok(Value::Object(_)));
            prop_assert_eq!(parsed.is_some(), object);
            if let Some(md) = parsed {
                prop_assert!(md.len() <= aigate_store::MAX_METADATA);
            }
            Ok(())
        })?;
    }

    /// `cf-aig-custom-cost`.
    #[test]
    fn custom_cost(v in prop_oneof![
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (leaf(), leaf(), proptest::option::of(leaf())).prop_map(|(a, b, c)| {
            let mut o = json!({"per_token_in": a, "per_token_out": b});
            if let Some(c) = c { o["per_cache_read_token"] = c; }
            o.to_string().into_bytes()
        }),
        proptest::collection::vec(any::<u8>(), 0..48),
    ]) {
        timed("custom_cost", || check_custom_cost(&v))?;
    }

    /// The Universal Endpoint's body: any bytes, or arrays of steps with any fields; every step's
    /// route stays under its provider's base URL.
    #[test]
    fn universal_chain(body in prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        4 => proptest::collection::vec(universal_step(), 0..12).prop_map(|s| Value::Array(s).to_string().into_bytes()),
    ]) {
        timed("universal", || {
            let base = universal_base(&UNIVERSAL_URI);
            match universal::chain(&body) {
                Ok(c) => {
                    prop_assert!((1..=MAX_STEPS).contains(&c.steps.len()));
                    for s in &c.steps {
                        prop_assert!(!s.provider.is_empty() && !s.endpoint.starts_with('/'));
                        if let Some(n) = s.retry.max_attempts { prop_assert!((1..=5).contains(&n)); }
                        if let Some(t) = s.timeout { prop_assert!(!t.is_zero()); }
                        check_step(&base, &s.provider, &s.endpoint)?;
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })?;
    }

    /// A step's endpoint straight into the route of a step.
    #[test]
    fn step_route(provider in proptest::sample::select(vec!["openai", "anthropic", "compat", "workers-ai", "azure-openai", "local", "bare", "tmpl", "acct", "nope", ""]),
                  endpoint in segments(6)) {
        timed("for_step", || check_step(&universal_base(&UNIVERSAL_URI), provider, &endpoint))?;
    }

    /// Dynamic routes: any request and metadata; the chain is one of the route's arms.
    #[test]
    fn dynamic_route(req in chat_request(), h in header_map(), name in proptest::sample::select(vec!["support", "ab", "nope", ""])) {
        timed("dynamic", || {
            let gw = SETTINGS.gateways.get("prod").unwrap();
            let _ = routing::dynamic::route_name(&format!("dynamic/{name}"));
            match routing::dynamic::find(&gw.routes, &gw.name, name) {
                Ok(r) => match r.chain(&req, &h) {
                    Ok(c) => {
                        prop_assert!((1..=MAX_STEPS).contains(&c.steps.len()));
                        for s in &c.steps {
                            let body: Value = serde_json::from_slice(&s.body).unwrap();
                            let model = body["model"].as_str().unwrap();
                            let suffix = format!("/{}", s.model.as_deref().unwrap());
                            prop_assert!(model.ends_with(&suffix), "{model}");
                        }
                        let _ = (r.describe(), r.label());
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                },
                Err(e) => prop_assert!(e.to_string().contains("support")),
            }
            Ok(())
        })?;
    }

}

fn universal_step() -> impl Strategy<Value = Value> {
    let provider = prop_oneof![
        4 => proptest::sample::select(vec!["openai", "anthropic", "compat", "workers-ai", "azure-openai", "local", "tmpl", "acct", "nope", ""])
            .prop_map(|s| json!(s)),
        1 => leaf(),
    ];
    let endpoint = prop_oneof![4 => segments(6).prop_map(Value::String), 1 => leaf()];
    let headers = proptest::collection::vec(
        (prop_oneof![proptest::sample::select(HEADER_NAMES).prop_map(str::to_owned), "\\PC{0,6}"], leaf()),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect()));
    let config = proptest::collection::vec(
        (proptest::sample::select(vec!["requestTimeout", "maxAttempts", "retryDelay", "backoff", "x"]), leaf()),
        0..4,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    (
        provider,
        endpoint,
        proptest::option::of(headers),
        proptest::option::of(json_value()),
        proptest::option::of(config),
        json_value(),
    )
        .prop_map(|(provider, endpoint, headers, query, config, junk)| {
            let mut o = Map::new();
            o.insert("provider".into(), provider);
            o.insert("endpoint".into(), endpoint);
            if let Some(h) = headers {
                o.insert("headers".into(), h);
            }
            if let Some(q) = query {
                o.insert("query".into(), q);
            }
            if let Some(c) = config {
                o.insert("config".into(), c);
            }
            if junk.is_null() {
                o.insert("extra".into(), junk);
            }
            Value::Object(o)
        })
}

fn check_custom_cost(v: &[u8]) -> Result<(), TestCaseError> {
    match CustomCost::parse(v) {
        Ok(c) => {
            for rate in [Some(c.per_token_in), Some(c.per_token_out), c.per_cache_read_token, c.per_cache_write_token]
                .into_iter()
                .flatten()
            {
                prop_assert!(rate.is_finite() && rate >= 0.0);
            }
            let u = Usage {
                input_tokens: 1000,
                output_tokens: 10,
                cached_input_tokens: 10,
                cache_write_tokens: 5,
                reasoning_tokens: 1,
                model: None,
            };
            let cost = c.cost(&u);
            prop_assert!(!cost.is_nan() && cost >= 0.0, "{cost}");
        }
        Err(e) => prop_assert!(e.to_string().contains("cf-aig-custom-cost")),
    }
    Ok(())
}
