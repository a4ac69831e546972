//! The cache key: a BLAKE3 digest over the gateway, provider, method, path, query, a canonical form
//! of the body and (with `scope = "credential"`) the credentials the request uses.
//!
//! The canonical form of a JSON body ignores object key order and insignificant whitespace, and
//! writes integral floats as integers (`1.0` and `1` are the same temperature); any other
//! difference changes the key. Bodies that are not JSON are hashed as they are. Every part is
//! length-prefixed, so no two different requests can produce the same byte stream.

use std::io::Write;

use aigate_store::CacheKey;
use serde_json::Value;

/// What goes into a computed key.
#[derive(Clone, Copy)]
pub struct KeyInput<'a> {
    /// Gateway name.
    pub gateway: &'a str,
    /// Provider name.
    pub provider: &'a str,
    /// HTTP method.
    pub method: &'a http::Method,
    /// Provider path.
    pub path: &'a str,
    /// Raw query string.
    pub query: &'a str,
    /// Request body.
    pub body: &'a [u8],
    /// Credential material (provider key, gateway token); empty with `scope = "gateway"`.
    pub credentials: &'a [&'a [u8]],
}

/// Computes the key of a request.
pub fn compute(input: &KeyInput<'_>) -> CacheKey {
    let mut h = blake3::Hasher::new();
    h.update(b"aigate-cache-v1");
    for part in [input.gateway, input.provider, input.method.as_str(), input.path, input.query] {
        put(&mut h, part.as_bytes());
    }
    match serde_json::from_slice::<Value>(input.body) {
        Ok(v) if !input.body.is_empty() => {
            h.update(b"J");
            write_canonical(&mut h, &v);
        }
        _ => {
            h.update(b"R");
            put(&mut h, input.body);
        }
    }
    h.update(&(input.credentials.len() as u64).to_le_bytes());
    for c in input.credentials {
        put(&mut h, c);
    }
    CacheKey(*h.finalize().as_bytes())
}

/// The key for a client-chosen `cf-aig-cache-key`: namespaced by the gateway and by the
/// credentials (none with `scope = "gateway"`, where every credential shares it), so no caller
/// reads an answer cached under another caller's custom key.
pub fn custom(gateway: &str, custom_key: &str, credentials: &[&[u8]]) -> CacheKey {
    let mut h = blake3::Hasher::new();
    h.update(b"aigate-cache-custom-v2");
    put(&mut h, gateway.as_bytes());
    put(&mut h, custom_key.as_bytes());
    h.update(&(credentials.len() as u64).to_le_bytes());
    for c in credentials {
        put(&mut h, c);
    }
    CacheKey(*h.finalize().as_bytes())
}

fn put(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

/// Writes a canonical serialisation of `v` into the hasher.
fn write_canonical(h: &mut blake3::Hasher, v: &Value) {
    match v {
        Value::Null => {
            h.update(b"n");
        }
        Value::Bool(b) => {
            h.update(if *b { b"t" } else { b"f" });
        }
        Value::Number(n) => {
            h.update(b"#");
            if let Some(i) = n.as_i64() {
                let _ = write!(h, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(h, "{u}");
            } else if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    let _ = write!(h, "{}", f as i64);
                } else {
                    let _ = write!(h, "{f:e}");
                }
            }
            h.update(b";");
        }
        Value::String(s) => {
            h.update(b"s");
            put(h, s.as_bytes());
        }
        Value::Array(a) => {
            h.update(b"[");
            h.update(&(a.len() as u64).to_le_bytes());
            for x in a {
                write_canonical(h, x);
            }
        }
        Value::Object(m) => {
            h.update(b"{");
            h.update(&(m.len() as u64).to_le_bytes());
            // Sort explicitly: serde_json's map keeps insertion order if any crate in the build
            // enables its `preserve_order` feature.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            for k in keys {
                put(h, k.as_bytes());
                if let Some(x) = m.get(k) {
                    write_canonical(h, x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(body: &str, cred: &[u8]) -> CacheKey {
        compute(&KeyInput {
            gateway: "g",
            provider: "openai",
            method: &http::Method::POST,
            path: "chat/completions",
            query: "",
            body: body.as_bytes(),
            credentials: &[cred],
        })
    }

    #[test]
    fn order_whitespace_and_number_forms() {
        let a = key(r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#, b"k");
        let b = key(
            "{ \"messages\" : [ {\"content\":\"hi\", \"role\":\"user\"} ],\n \"temperature\": 1.0, \"model\":\"m\" }",
            b"k",
        );
        assert_eq!(a, b);
        assert_ne!(a, key(r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi!"}]}"#, b"k"));
        assert_ne!(a, key(r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#, b"k2"));
        // Array order is meaningful.
        assert_ne!(key(r#"{"a":[1,2]}"#, b""), key(r#"{"a":[2,1]}"#, b""));
        // A string "1" is not the number 1.
        assert_ne!(key(r#"{"a":"1"}"#, b""), key(r#"{"a":1}"#, b""));
        assert_ne!(custom("g", "x", &[]), custom("h", "x", &[]));
        assert_ne!(custom("g", "x", &[b"k"]), custom("g", "x", &[]));
        assert_ne!(custom("g", "x", &[b"k"]), custom("g", "x", &[b"k2"]));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[a-z ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Re-serialises an object with keys in reverse order and extra whitespace.
    fn shuffled(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let mut parts: Vec<String> =
                    m.iter().map(|(k, x)| format!(" {} :\n {}", Value::from(k.clone()), shuffled(x))).collect();
                parts.reverse();
                format!("{{ {} }}", parts.join(" , "))
            }
            Value::Array(a) => format!("[ {} ]", a.iter().map(shuffled).collect::<Vec<_>>().join(" ,\t")),
            other => other.to_string(),
        }
    }

    proptest! {
        #[test]
        fn key_order_and_whitespace_never_matter(v in arb_json()) {
            let plain = v.to_string();
            let other = shuffled(&v);
            prop_assert_eq!(key(&plain, b"k"), key(&other, b"k"));
        }

        #[test]
        fn different_bodies_or_credentials_never_collide(a in arb_json(), b in arb_json(), ca in "[a-z]{0,6}", cb in "[a-z]{0,6}") {
            let same = a == b && ca == cb;
            prop_assert_eq!(key(&a.to_string(), ca.as_bytes()) == key(&b.to_string(), cb.as_bytes()), same);
        }
    }
}
