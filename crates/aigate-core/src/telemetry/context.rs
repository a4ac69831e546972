//! The caller's trace context, read from the request head: W3C `traceparent`, or Cloudflare's
//! `cf-aig-otel-trace-id` (32 hex digits) and `cf-aig-otel-parent-span-id` (16 hex digits).
//!
//! Read on the request path, so it costs nothing when neither header is sent (two failed header
//! lookups) and never allocates: the ids are decoded into fixed arrays kept on the meter. An
//! invalid header is ignored (the request starts a trace of its own), as W3C Trace Context asks.

use http::{HeaderMap, HeaderName};

/// `traceparent` (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Cloudflare AI Gateway's trace id header (32 hex digits).
pub const CF_AIG_OTEL_TRACE_ID: HeaderName = HeaderName::from_static("cf-aig-otel-trace-id");
/// Cloudflare AI Gateway's parent span id header (16 hex digits).
pub const CF_AIG_OTEL_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("cf-aig-otel-parent-span-id");

/// The trace a request joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The caller's trace id (never all zeros).
    pub trace_id: [u8; 16],
    /// The caller's span, the parent of the request's span (`None`: the span is the trace's root).
    pub parent_span_id: Option<[u8; 8]>,
    /// The caller records this trace (`traceparent`'s sampled flag; the Cloudflare headers have
    /// none, so they always sample). An unsampled request exports no span; metrics count it.
    pub sampled: bool,
}

impl TraceContext {
    /// The context of a request's headers: the Cloudflare headers when they carry a valid trace id
    /// (they are addressed to the gateway, so they win), else a valid `traceparent`, else `None`.
    pub fn from_headers(h: &HeaderMap) -> Option<TraceContext> {
        if let Some(trace_id) = h.get(CF_AIG_OTEL_TRACE_ID).and_then(|v| hex_id::<16>(v.as_bytes())) {
            let parent_span_id = h.get(CF_AIG_OTEL_PARENT_SPAN_ID).and_then(|v| hex_id::<8>(v.as_bytes()));
            return Some(TraceContext { trace_id, parent_span_id, sampled: true });
        }
        h.get(TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes()))
    }
}

/// `version-traceid-parentid-flags`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
/// A later version may append fields after a `-`; version `ff` is invalid.
fn parse_traceparent(v: &[u8]) -> Option<TraceContext> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_id::<1>(&v[..2])?[0];
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex_id::<16>(&v[3..35])?;
    let parent = hex_id::<8>(&v[36..52])?;
    let flags = hex_id::<1>(&v[53..55])?[0];
    Some(TraceContext { trace_id, parent_span_id: Some(parent), sampled: flags & 1 == 1 })
}

/// `N` bytes from exactly `2N` hex digits (either case); `None` when malformed or all zeros (an
/// invalid id in both W3C Trace Context and OTLP).
fn hex_id<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    // A one-byte field (version, flags) may be zero; an id may not.
    (N == 1 || out.iter().any(|&b| b != 0)).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert((*k).clone(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn traceparent_parsed() {
        let h = headers(&[(&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]);
        let c = TraceContext::from_headers(&h).unwrap();
        assert_eq!(c.trace_id[..4], [0x4b, 0xf9, 0x2f, 0x35]);
        assert_eq!(c.parent_span_id, Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]));
        assert!(c.sampled);
        let h = headers(&[(&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]);
        assert!(!TraceContext::from_headers(&h).unwrap().sampled);
        // A later version with an extra field.
        let h = headers(&[(&TRACEPARENT, "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")]);
        assert!(TraceContext::from_headers(&h).is_some());
    }

    #[test]
    fn invalid_traceparents_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let h = headers(&[(&TRACEPARENT, bad)]);
            assert_eq!(TraceContext::from_headers(&h), None, "{bad:?}");
        }
        assert_eq!(TraceContext::from_headers(&HeaderMap::new()), None);
    }

    #[test]
    fn cloudflare_headers_win() {
        let h = headers(&[
            (&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            (&CF_AIG_OTEL_TRACE_ID, "0af7651916cd43dd8448eb211c80319c"),
            (&CF_AIG_OTEL_PARENT_SPAN_ID, "B7AD6B7169203331"),
        ]);
        let c = TraceContext::from_headers(&h).unwrap();
        assert_eq!(c.trace_id[0], 0x0a);
        assert_eq!(c.parent_span_id.unwrap()[0], 0xb7);
        assert!(c.sampled);
        // A trace id alone: the span is the root of that trace.
        let h = headers(&[(&CF_AIG_OTEL_TRACE_ID, "0af7651916cd43dd8448eb211c80319c")]);
        assert_eq!(TraceContext::from_headers(&h).unwrap().parent_span_id, None);
        // A malformed trace id falls back to traceparent.
        let h = headers(&[
            (&CF_AIG_OTEL_TRACE_ID, "0af7651916cd43dd"),
            (&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ]);
        assert_eq!(TraceContext::from_headers(&h).unwrap().trace_id[0], 0x4b);
    }
}
