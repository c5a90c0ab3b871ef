//! The schema files of `schemas/`, embedded at build time, parsed once, and looked up by
//! CRC-64-AVRO (Rabin) fingerprint.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use apache_avro::Schema;

/// One embedded schema file: `schemas/{family}/v{version}.avsc`.
struct SchemaFile {
    family: &'static str,
    version: u32,
    text: &'static str,
}

macro_rules! schema_file {
    ($family:literal, $version:literal) => {
        SchemaFile {
            family: $family,
            version: $version,
            text: include_str!(concat!(
                "../../../schemas/",
                $family,
                "/v",
                $version,
                ".avsc"
            )),
        }
    };
}

/// Every published schema version. Add a line here when you add a file to `schemas/`.
const FILES: &[SchemaFile] = &[
    schema_file!("raw-envelope", 1),
    schema_file!("telemetry", 1),
    schema_file!("telemetry", 2),
    schema_file!("enriched", 1),
    schema_file!("aggregate", 1),
    schema_file!("dead-letter", 1),
    schema_file!("bundle", 1),
];

/// The 8-byte CRC-64-AVRO fingerprint of a schema's parsing canonical form, in the byte order
/// single-object encoding puts on the wire (little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 8]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A parsed schema version.
#[derive(Debug)]
pub struct SchemaVersion {
    /// Family folder name, e.g. `telemetry`.
    pub family: &'static str,
    /// Version number from the file name.
    pub version: u32,
    /// The parsed schema.
    pub schema: Schema,
    /// The same schema prepared for the per-record codec (`serde_avro_fast`).
    pub fast: serde_avro_fast::Schema,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
}

/// All embedded schema versions.
#[derive(Debug)]
pub struct SchemaRegistry {
    versions: Vec<SchemaVersion>,
    by_fingerprint: HashMap<Fingerprint, usize>,
}

impl SchemaRegistry {
    fn load() -> Result<Self, String> {
        let mut versions = Vec::with_capacity(FILES.len());
        let mut by_fingerprint = HashMap::new();
        for file in FILES {
            let schema = Schema::parse_str(file.text)
                .map_err(|e| format!("schemas/{}/v{}.avsc: {e}", file.family, file.version))?;
            let fast = file
                .text
                .parse::<serde_avro_fast::Schema>()
                .map_err(|e| format!("schemas/{}/v{}.avsc: {e}", file.family, file.version))?;
            let fingerprint =
                Fingerprint(crc64_avro(parsing_canonical_form(&schema).as_bytes()).to_le_bytes());
            if by_fingerprint.insert(fingerprint, versions.len()).is_some() {
                return Err(format!(
                    "schemas/{}/v{}.avsc has the same fingerprint as another version",
                    file.family, file.version
                ));
            }
            versions.push(SchemaVersion {
                family: file.family,
                version: file.version,
                schema,
                fast,
                fingerprint,
            });
        }
        Ok(Self {
            versions,
            by_fingerprint,
        })
    }

    /// Every version of every family.
    pub fn versions(&self) -> &[SchemaVersion] {
        &self.versions
    }

    /// The version with this fingerprint.
    pub fn by_fingerprint(&self, fingerprint: &Fingerprint) -> Option<&SchemaVersion> {
        self.by_fingerprint
            .get(fingerprint)
            .map(|&i| &self.versions[i])
    }

    /// One version of a family.
    pub fn get(&self, family: &str, version: u32) -> Option<&SchemaVersion> {
        self.versions
            .iter()
            .find(|v| v.family == family && v.version == version)
    }

    /// The newest version of a family.
    pub fn latest(&self, family: &str) -> Option<&SchemaVersion> {
        self.versions
            .iter()
            .filter(|v| v.family == family)
            .max_by_key(|v| v.version)
    }

    /// All versions of a family, oldest first.
    pub fn family(&self, family: &str) -> Vec<&SchemaVersion> {
        let mut out: Vec<_> = self
            .versions
            .iter()
            .filter(|v| v.family == family)
            .collect();
        out.sort_by_key(|v| v.version);
        out
    }
}

/// The Parsing Canonical Form of the Avro specification. apache-avro's `canonical_form()`
/// keeps a logical type's base as `{"type":"long"}` where the specification (and the Java and
/// Python implementations) write `"long"`; fingerprints must match theirs, so that is undone
/// here. In canonical form such an object can only be a lone primitive: records carry a name
/// and fields, and names cannot contain quotes or braces.
pub fn parsing_canonical_form(schema: &Schema) -> String {
    let mut form = schema.canonical_form();
    for primitive in [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ] {
        form = form.replace(
            &format!("{{\"type\":\"{primitive}\"}}"),
            &format!("\"{primitive}\""),
        );
    }
    form
}

/// CRC-64-AVRO (Rabin) fingerprint, as given in the Avro specification.
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: LazyLock<[u64; 256]> = LazyLock::new(|| {
        let mut table = [0u64; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        table
    });
    bytes.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize]
    })
}

static REGISTRY: LazyLock<SchemaRegistry> = LazyLock::new(|| match SchemaRegistry::load() {
    Ok(registry) => registry,
    // The files are compiled in and checked by this crate's tests: a bad one is a build defect.
    #[allow(clippy::panic)]
    Err(e) => panic!("embedded schema is invalid: {e}"),
});

/// The process-wide registry of embedded schemas.
pub fn schema_registry() -> &'static SchemaRegistry {
    &REGISTRY
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

    /// The published fingerprints: a published version never changes.
    const PUBLISHED: &str = include_str!("../../../schemas/fingerprints.txt");

    fn published() -> Vec<(String, u32, String)> {
        PUBLISHED
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let parts: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(parts.len(), 3, "bad line in fingerprints.txt: {l}");
                let version = parts[1].trim_start_matches('v').parse().expect("version");
                (parts[0].to_string(), version, parts[2].to_string())
            })
            .collect()
    }

    #[test]
    fn every_file_in_schemas_dir_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas");
        let mut on_disk = Vec::new();
        for family in std::fs::read_dir(dir).expect("schemas dir") {
            let family = family.expect("entry").path();
            if !family.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(&family).expect("family dir") {
                let name = file
                    .expect("entry")
                    .file_name()
                    .into_string()
                    .expect("utf8");
                if let Some(v) = name.strip_prefix('v').and_then(|n| n.strip_suffix(".avsc")) {
                    let fam = family
                        .file_name()
                        .expect("name")
                        .to_string_lossy()
                        .to_string();
                    on_disk.push((fam, v.parse::<u32>().expect("vN.avsc")));
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<_> = schema_registry()
            .versions()
            .iter()
            .map(|v| (v.family.to_string(), v.version))
            .collect();
        embedded.sort();
        assert_eq!(
            on_disk, embedded,
            "add new schema files to FILES in schemas.rs"
        );
    }

    /// A published version is immutable: producers put its fingerprint on every message, so
    /// editing it in place would make stored data unreadable. Change = new version file.
    #[test]
    fn published_schemas_are_unchanged() {
        let published = published();
        for v in schema_registry().versions() {
            let entry = published
                .iter()
                .find(|(f, n, _)| f == v.family && *n == v.version)
                .unwrap_or_else(|| {
                    panic!(
                        "schemas/{}/v{}.avsc is not in schemas/fingerprints.txt; add: {} v{} {}",
                        v.family, v.version, v.family, v.version, v.fingerprint
                    )
                });
            assert_eq!(
                entry.2,
                v.fingerprint.to_string(),
                "schemas/{}/v{}.avsc was edited after it was published; restore it and add v{} instead",
                v.family,
                v.version,
                v.version + 1
            );
        }
        assert_eq!(
            published.len(),
            schema_registry().versions().len(),
            "fingerprints.txt lists a removed schema"
        );
    }

    /// Full transitive compatibility: any version can read data of any other version of its
    /// family, so producers and consumers can be upgraded in any order.
    #[test]
    fn versions_of_a_family_are_mutually_compatible() {
        for v in schema_registry().versions() {
            for other in schema_registry().family(v.family) {
                let verdict = SchemaCompatibility::can_read(&v.schema, &other.schema);
                assert!(
                    matches!(verdict, Ok(Compatibility::Full)),
                    "{} v{} written cannot be read by v{}: {verdict:?}",
                    v.family,
                    v.version,
                    other.version
                );
            }
        }
    }

    #[test]
    fn crc64_matches_apache_avro_and_canonical_form_matches_the_spec() {
        use apache_avro::rabin::Rabin;
        for text in [
            r#""long""#,
            r#"{"type":"record","name":"a.B","fields":[{"name":"x","type":"int"}]}"#,
        ] {
            let schema = Schema::parse_str(text).expect("parse");
            let theirs = schema.fingerprint::<Rabin>().bytes;
            assert_eq!(
                crc64_avro(schema.canonical_form().as_bytes())
                    .to_le_bytes()
                    .as_slice(),
                theirs.as_slice()
            );
        }
        let ts = Schema::parse_str(
            r#"{"type":"record","name":"a.T","fields":[{"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#,
        )
        .expect("parse");
        assert_eq!(
            parsing_canonical_form(&ts),
            r#"{"name":"a.T","type":"record","fields":[{"name":"t","type":"long"}]}"#
        );
    }

    #[test]
    fn incompatible_edit_is_detected() {
        // The check above must be able to fail: a v3 that drops a field without default and
        // adds one without default is not readable from v2 data.
        let v2 = &schema_registry().get("telemetry", 2).expect("v2").schema;
        let text = FILES
            .iter()
            .find(|f| f.family == "telemetry" && f.version == 2)
            .expect("file")
            .text
            .replace(
                "\"name\": \"kind\", \"type\": \"string\"",
                "\"name\": \"kind2\", \"type\": \"string\"",
            );
        let broken = Schema::parse_str(&text).expect("parse");
        assert!(SchemaCompatibility::can_read(v2, &broken).is_err());
    }
}
