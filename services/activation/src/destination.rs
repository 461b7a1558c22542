//! Destinations and how changes reach them. This slice ships the file
//! destination: each sync's adds and removes as one JSONL file, written
//! atomically so a reader never sees half a sync.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use madtech_common::error::FieldError;
use serde::{Deserialize, Serialize};

/// An identifier as it crossed the gateway: its kind and a hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HashedIdentifier {
    pub kind: String,
    pub sha256: String,
}

/// One change sent to a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Add {
        id: String,
        identifiers: Vec<HashedIdentifier>,
    },
    Remove {
        id: String,
    },
}

/// Where a destination delivers, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// JSONL files in a directory below the service's file root.
    File { directory: PathBuf },
}

impl Target {
    /// The destination kind the gateway's consent policy knows it by.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::File { .. } => "file",
        }
    }
}

/// Accepts a relative directory without `..`, so a destination cannot
/// write outside the file root.
pub fn file_directory(field: &str, directory: &str) -> Result<PathBuf, FieldError> {
    let path = PathBuf::from(directory.trim());
    if path.as_os_str().is_empty() {
        return Err(FieldError::required(field));
    }
    let confined = path
        .components()
        .all(|component| matches!(component, Component::Normal(_) | Component::CurDir));
    if !confined {
        return Err(FieldError::new(
            field,
            "must be a relative path without `..` (it lives below the activation file root)",
        ));
    }
    Ok(path)
}

/// Writes `changes` as JSONL to `directory/name` atomically: a temporary
/// file, synced, renamed into place, and the directory synced, so a crash
/// leaves either the whole file or none.
pub fn write_jsonl(directory: &Path, name: &str, changes: &[Change]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(directory)?;
    let mut temp = tempfile::NamedTempFile::new_in(directory)?;
    {
        let mut out = std::io::BufWriter::new(temp.as_file_mut());
        for change in changes {
            serde_json::to_writer(&mut out, change)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    temp.as_file().sync_all()?;
    let path = directory.join(name);
    temp.persist(&path).map_err(|err| err.error)?;
    std::fs::File::open(directory)?.sync_all()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_stay_below_the_root() {
        assert_eq!(
            file_directory("d", "exports/meta").expect("ok"),
            PathBuf::from("exports/meta")
        );
        for bad in ["/etc", "../outside", "a/../../b", "  "] {
            assert!(file_directory("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jsonl_files_hold_one_change_per_line() {
        let dir = tempfile::tempdir().expect("dir");
        let changes = vec![
            Change::Add {
                id: "p1".into(),
                identifiers: vec![HashedIdentifier {
                    kind: "email".into(),
                    sha256: "ab".into(),
                }],
            },
            Change::Remove { id: "p2".into() },
        ];
        let path = write_jsonl(&dir.path().join("out"), "sync.jsonl", &changes).expect("write");
        let text = std::fs::read_to_string(path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines[0]["op"], "add");
        assert_eq!(lines[0]["identifiers"][0]["sha256"], "ab");
        assert_eq!(lines[1], serde_json::json!({"op": "remove", "id": "p2"}));
        let leftovers = std::fs::read_dir(dir.path().join("out"))
            .expect("ls")
            .count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }
}
