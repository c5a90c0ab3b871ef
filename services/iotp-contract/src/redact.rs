//! The one rule for secrets in configuration, for everything that prints a configuration:
//! `--check-config` ([`to_toml`], in `iotp_core::service`) and the `Debug` of every config
//! struct that holds a secret ([`debug`]: iotp-core's Kafka, MQTT and dead-letter settings,
//! iotp-store's `StoreConfig`, the DLQ handler's config). It lives in the bottom crate because
//! iotp-core and iotp-store, which do not know each other, both print configurations.
//!
//! What is hidden (replaced by [`REDACTED`]):
//! - the password inside a URI, wherever a string holds one: `amqp://user:pw@host/vhost`
//!   prints as `amqp://user:***@host/vhost`, so scheme, user, hosts, path and the other query
//!   parameters stay readable; a query parameter named like a secret
//!   (`mongodb://…/?tlsCertificateKeyFilePassword=…`) is hidden too;
//! - the whole value of a key that names a secret ([`is_secret_key`]): a Kafka property such as
//!   `sasl.password`, `ssl.key.password`, `ssl.keystore.password`, `ssl.key.pem` or
//!   `sasl.oauthbearer.client.secret`, the MQTT `password`, and any value nested under such a
//!   key; but not a key that names a file (`mongodb_password_file`, `ssl.keystore.location`):
//!   its value is a path, and the secret stays in the file.
//!
//! A string is taken for a URI with a password if it has `://` and, after it, an `@` preceded
//! by a `:`. A password with unencoded `/`, `?` or `@` in it is still hidden (everything up to
//! the last `@` counts as user and password), at the price of hiding more than the password in
//! a URI whose path or query holds an `@`.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use toml_edit::{DocumentMut, Item, TableLike, Value};

/// What a secret prints as.
pub const REDACTED: &str = "***";

/// Parts of a key's name that make its value a secret, matched in lowercase anywhere in the key.
const SECRET_WORDS: [&str; 5] = ["password", "passwd", "passphrase", "secret", "credential"];

/// Endings of a key's name that make its value a secret: a private key in PEM (`ssl.key.pem`,
/// `sasl.oauthbearer.assertion.private.key.pem`), a token (`api_token`, not `api_token_file`,
/// which names a file), an API key.
const SECRET_ENDINGS: [&str; 5] = ["key.pem", "token", "api_key", "apikey", "access_key"];

/// Keys librdkafka marks sensitive whose names the rules above miss: its private key object,
/// and the OAUTHBEARER configuration, which may carry credentials.
const SECRET_KEYS: [&str; 2] = ["ssl_key", "sasl.oauthbearer.config"];

/// Endings of a key's name that make its value the path of a file, not the secret it may
/// hold (`sasl_password_file`, `mongodb_password_file`, `ssl.keystore.location`): the path is
/// printed, the file's contents never are.
const PATH_ENDINGS: [&str; 3] = ["_file", ".location", "_location"];

/// Whether a setting of this name holds a secret (case does not matter).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if PATH_ENDINGS.iter().any(|e| key.ends_with(e)) {
        return false;
    }
    SECRET_WORDS.iter().any(|w| key.contains(w))
        || SECRET_ENDINGS.iter().any(|e| key.ends_with(e))
        || SECRET_KEYS.contains(&key.as_str())
}

/// `text` with the password of every URI in it replaced by [`REDACTED`] (and every query
/// parameter named like a secret); borrowed when there was nothing to hide.
pub fn uri(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let (mut copied, mut from) = (0, 0);
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        let end = text[start..]
            .find(char::is_whitespace)
            .map_or(text.len(), |i| start + i);
        if let Some(hidden) = after_scheme(&text[start..end]) {
            out.push_str(&text[copied..start]);
            out.push_str(&hidden);
            copied = end;
        }
        from = end;
    }
    if copied == 0 {
        Cow::Borrowed(text)
    } else {
        out.push_str(&text[copied..]);
        Cow::Owned(out)
    }
}

/// The part of a URI after `scheme://` with its secrets hidden, if it has any.
fn after_scheme(rest: &str) -> Option<String> {
    let mut out = String::with_capacity(rest.len());
    let mut hidden = false;
    let tail = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(REDACTED);
                    hidden = true;
                }
                None => out.push_str(userinfo),
            }
            &rest[at..]
        }
        None => rest,
    };
    let Some((head, query)) = tail.split_once('?') else {
        out.push_str(tail);
        return hidden.then_some(out);
    };
    out.push_str(head);
    out.push('?');
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) if is_secret_key(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
                hidden = true;
            }
            _ => out.push_str(pair),
        }
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    hidden.then_some(out)
}

/// Why a configuration could not be printed. The messages never hold the configuration's text.
#[derive(Debug, thiserror::Error)]
pub enum PrintError {
    /// The configuration has no TOML form.
    #[error("cannot write the configuration as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
    /// The TOML written could not be read back to hide its secrets (a defect).
    #[error("cannot read back the TOML written: {0}")]
    Reparse(String),
}

/// `value` as pretty TOML (as `toml::to_string_pretty` writes it), secrets hidden: what
/// `--check-config` prints.
pub fn to_toml<T: Serialize + ?Sized>(value: &T) -> Result<String, PrintError> {
    let text = toml::to_string_pretty(value)?;
    // The parser's error would quote the offending line, which may hold a secret.
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| PrintError::Reparse(e.message().to_string()))?;
    table(doc.as_table_mut(), false);
    Ok(doc.to_string())
}

fn table(t: &mut dyn TableLike, secret: bool) {
    for (key, v) in t.iter_mut() {
        item(v, secret || is_secret_key(key.get()));
    }
}

fn item(i: &mut Item, secret: bool) {
    match i {
        Item::None => {}
        Item::Value(v) => value(v, secret),
        Item::Table(t) => table(t, secret),
        Item::ArrayOfTables(a) => {
            for t in a.iter_mut() {
                table(t, secret);
            }
        }
    }
}

fn value(v: &mut Value, secret: bool) {
    let replacement = match v {
        Value::Array(a) => {
            for v in a.iter_mut() {
                value(v, secret);
            }
            None
        }
        Value::InlineTable(t) => {
            table(t, secret);
            None
        }
        _ if secret => Some(REDACTED.to_string()),
        Value::String(s) => match uri(s.value()) {
            Cow::Owned(hidden) => Some(hidden),
            Cow::Borrowed(_) => None,
        },
        _ => None,
    };
    if let Some(text) = replacement {
        let decor = v.decor().clone();
        *v = Value::from(text);
        *v.decor_mut() = decor;
    }
}

/// `Debug` for a config struct, secrets hidden: its fields as serde writes them (durations
/// as `"5s"`), named `name`. For a `Debug` impl: `redact::debug("KafkaConfig", self, f)`.
/// Prints `name { .. }` if the value has no TOML form, rather than anything unredacted.
pub fn debug<T: Serialize + ?Sized>(
    name: &str,
    value: &T,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let Ok(mut doc) = toml_edit::ser::to_document(value) else {
        return f.debug_struct(name).finish_non_exhaustive();
    };
    table(doc.as_table_mut(), false);
    let mut s = f.debug_struct(name);
    for (key, i) in doc.as_table().iter() {
        s.field(key, &ItemDebug(i));
    }
    s.finish()
}

struct ItemDebug<'a>(&'a Item);

impl fmt::Debug for ItemDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Item::None => f.write_str("None"),
            Item::Value(v) => ValueDebug(v).fmt(f),
            Item::Table(t) => TableDebug(t).fmt(f),
            Item::ArrayOfTables(a) => f.debug_list().entries(a.iter().map(TableDebug)).finish(),
        }
    }
}

struct TableDebug<'a>(&'a toml_edit::Table);

impl fmt::Debug for TableDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, i)| (k, ItemDebug(i))))
            .finish()
    }
}

struct ValueDebug<'a>(&'a Value);

impl fmt::Debug for ValueDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::String(s) => fmt::Debug::fmt(s.value(), f),
            Value::Integer(i) => fmt::Debug::fmt(i.value(), f),
            Value::Float(x) => fmt::Debug::fmt(x.value(), f),
            Value::Boolean(b) => fmt::Debug::fmt(b.value(), f),
            Value::Datetime(d) => fmt::Display::fmt(d.value(), f),
            Value::Array(a) => f.debug_list().entries(a.iter().map(ValueDebug)).finish(),
            Value::InlineTable(t) => f
                .debug_map()
                .entries(t.iter().map(|(k, v)| (k, ValueDebug(v))))
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests;
