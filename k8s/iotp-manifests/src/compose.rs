//! `docker-compose.yml` (optionally with override files) as [`Launch`]es: the Compose
//! specification's merge rules (mappings merge, sequences append, `!reset` removes,
//! `!override` replaces), `<<` merge keys, `${VAR}` interpolation from an env file, secrets
//! mounted at `/run/secrets/<name>`, bind-mounted files and named volumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_yaml::value::Tag;
use serde_yaml::{Mapping, Value};

use crate::launch::Launch;

/// The merged Compose model of `files` (paths relative to `root`).
pub fn load(root: &Path, files: &[&str]) -> anyhow::Result<Value> {
    let mut merged = Value::Null;
    for file in files {
        let text = std::fs::read_to_string(root.join(file)).with_context(|| file.to_string())?;
        let mut value: Value = serde_yaml::from_str(&text).with_context(|| file.to_string())?;
        // A merged-in mapping can carry `<<` itself (x-iotp-store merges x-iotp).
        for _ in 0..4 {
            value.apply_merge()?;
        }
        merged = merge(merged, value);
    }
    Ok(merged)
}

fn merge(base: Value, over: Value) -> Value {
    match (base, over) {
        (_, Value::Tagged(t)) if t.tag == Tag::new("override") => untag(t.value),
        (Value::Mapping(mut a), Value::Mapping(b)) => {
            for (k, v) in b {
                match v {
                    Value::Tagged(t) if t.tag == Tag::new("reset") => {
                        a.remove(&k);
                    }
                    v => {
                        let old = a.remove(&k).unwrap_or(Value::Null);
                        let replace = matches!(k.as_str(), Some("command" | "entrypoint"));
                        let v = if replace { untag(v) } else { merge(old, v) };
                        a.insert(k, v);
                    }
                }
            }
            Value::Mapping(a)
        }
        (Value::Sequence(mut a), Value::Sequence(b)) => {
            a.extend(b.into_iter().map(untag));
            Value::Sequence(a)
        }
        (_, v) => untag(v),
    }
}

fn untag(v: Value) -> Value {
    match v {
        Value::Tagged(t) => untag(t.value),
        Value::Mapping(m) => Value::Mapping(m.into_iter().map(|(k, v)| (k, untag(v))).collect()),
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(untag).collect()),
        v => v,
    }
}

/// Variables of an env file (`KEY=value` lines), each value interpolated with the ones
/// before it, as Compose reads `.env`.
pub fn env_file(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("not KEY=value: {line}"))?;
        let v = interpolate(v.trim(), &vars)?;
        vars.insert(k.trim().to_string(), v);
    }
    Ok(vars)
}

/// `${VAR}`, `${VAR:?message}`, `${VAR:-default}` and `$$`, as Compose interpolates.
pub fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| anyhow!("unclosed ${{ in {text}"))?;
            let expr = &r[..end];
            rest = &r[end + 1..];
            let name_end = expr.find([':', '-', '?']).unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            match (vars.get(name).filter(|v| !v.is_empty()), op) {
                (Some(v), _) => out.push_str(v),
                (None, op) if op.starts_with(":-") => out.push_str(&op[2..]),
                (None, op) if op.starts_with(":?") => bail!("{name}: {}", &op[2..]),
                (None, _) => bail!("{name} is not set"),
            }
        } else {
            out.push('$');
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s.iter().filter_map(scalar).collect(),
        Value::String(s) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

/// A launch per service of the merged model (services under a profile included), with
/// `vars` (the `.env`) interpolated and bind mounts read relative to `root`.
pub fn launches(
    label: &str,
    model: &Value,
    vars: &BTreeMap<String, String>,
    root: &Path,
) -> anyhow::Result<Vec<Launch>> {
    let empty = Mapping::new();
    let secrets = model
        .get("secrets")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let services = model
        .get("services")
        .and_then(Value::as_mapping)
        .unwrap_or(&empty);
    let mut out = Vec::new();
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        let mut l = Launch {
            source: format!("{label} service {name}"),
            name: name.clone(),
            ..Launch::default()
        };
        let get = |k: &str| svc.get(k).cloned().unwrap_or(Value::Null);
        let mut argv = strings(&get("entrypoint"));
        argv.extend(strings(&get("command")));
        l.argv = argv
            .iter()
            .map(|a| interpolate(a, vars))
            .collect::<Result<_, _>>()?;
        match get("environment") {
            Value::Mapping(m) => {
                for (k, v) in m {
                    let value = scalar(&v).map(|v| interpolate(&v, vars)).transpose()?;
                    l.env
                        .insert(scalar(&k).unwrap_or_default(), value.unwrap_or_default());
                }
            }
            Value::Sequence(s) => {
                for item in s.iter().filter_map(scalar) {
                    let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                    l.env.insert(k.to_string(), interpolate(v, vars)?);
                }
            }
            _ => {}
        }
        for s in get("secrets").as_sequence().into_iter().flatten() {
            let (source, target) = match s {
                Value::Mapping(_) => {
                    let src = s.get("source").and_then(scalar).unwrap_or_default();
                    let target = s
                        .get("target")
                        .and_then(scalar)
                        .unwrap_or_else(|| src.clone());
                    (src, target)
                }
                s => (scalar(s).unwrap_or_default(), scalar(s).unwrap_or_default()),
            };
            let target = Path::new("/run/secrets").join(target);
            let def = secrets.get(source.as_str());
            let content = match def {
                Some(d) if d.get("environment").is_some() => {
                    let var = d.get("environment").and_then(scalar).unwrap_or_default();
                    vars.get(&var).cloned().map(String::into_bytes)
                }
                Some(d) if d.get("file").is_some() => {
                    let file = d.get("file").and_then(scalar).unwrap_or_default();
                    std::fs::read(root.join(file)).ok()
                }
                _ => None,
            };
            match content {
                Some(c) => {
                    l.files.insert(target, c);
                }
                None => l.unresolved.push(format!("secret {source} has no value")),
            }
        }
        for v in get("volumes")
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(scalar)
        {
            let parts: Vec<&str> = v.split(':').collect();
            let (src, dst) = match parts.as_slice() {
                [src, dst, ..] => (*src, PathBuf::from(dst)),
                _ => bail!("{}: volume {v} has no target", l.source),
            };
            if src.starts_with('.') || src.starts_with('/') {
                let host = root.join(src);
                match std::fs::read(&host) {
                    Ok(bytes) => {
                        l.files.insert(dst, bytes);
                    }
                    Err(e) => l.unresolved.push(format!("bind mount {src}: {e}")),
                }
            } else {
                l.dirs.insert(dst, format!("volume:{src}"));
            }
        }
        l.readiness = healthcheck(&get("healthcheck"));
        out.push(l);
    }
    Ok(out)
}

/// The path and port a `/dev/tcp` GET healthcheck asks.
fn healthcheck(h: &Value) -> Option<(String, u16)> {
    let test = strings(h.get("test")?).join(" ");
    let port = test.split("/dev/tcp/").nth(1)?.split('/').nth(1)?;
    let port: u16 = port
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    let path = test.split("GET ").nth(1)?.split_whitespace().next()?;
    Some((path.to_string(), port))
}
