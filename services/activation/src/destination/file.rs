//! The file destination: each batch of adds or removes as one JSONL or CSV
//! file, written atomically so a reader never sees half a batch. File names
//! are stable per batch, so a batch written again after a crash replaces
//! itself instead of appearing twice.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use madtech_common::error::FieldError;
use serde::{Deserialize, Serialize};

use super::{HashedIdentifier, Member, Op};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per member.
    #[default]
    Jsonl,
    /// `op,id,kind,sha256`, one line per identifier.
    Csv,
}

impl FileFormat {
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Jsonl => "jsonl",
            FileFormat::Csv => "csv",
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

#[derive(Serialize)]
struct JsonLine<'a> {
    op: Op,
    id: &'a str,
    identifiers: &'a [HashedIdentifier],
}

fn write_jsonl(out: &mut impl Write, op: Op, members: &[Member]) -> std::io::Result<()> {
    for member in members {
        let line = JsonLine {
            op,
            id: &member.id,
            identifiers: &member.identifiers,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn write_csv(out: &mut impl Write, op: Op, members: &[Member]) -> std::io::Result<()> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(["op", "id", "kind", "sha256"])?;
    for member in members {
        if member.identifiers.is_empty() {
            csv.write_record([op.as_str(), &member.id, "", ""])?;
        }
        for identifier in &member.identifiers {
            csv.write_record([
                op.as_str(),
                &member.id,
                &identifier.kind,
                &identifier.sha256,
            ])?;
        }
    }
    csv.flush()
}

/// Writes one batch to `directory/name` atomically: a temporary file, synced,
/// renamed into place, and the directory synced, so a crash leaves either
/// the whole file or none.
pub fn write_batch(
    directory: &Path,
    name: &str,
    format: FileFormat,
    op: Op,
    members: &[Member],
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(directory)?;
    let mut temp = tempfile::NamedTempFile::new_in(directory)?;
    {
        let mut out = std::io::BufWriter::new(temp.as_file_mut());
        match format {
            FileFormat::Jsonl => write_jsonl(&mut out, op, members)?,
            FileFormat::Csv => write_csv(&mut out, op, members)?,
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

    fn members() -> Vec<Member> {
        vec![
            Member {
                id: "p1".into(),
                identifiers: vec![
                    HashedIdentifier {
                        kind: "email".into(),
                        sha256: "ab".into(),
                    },
                    HashedIdentifier {
                        kind: "phone".into(),
                        sha256: "cd".into(),
                    },
                ],
            },
            Member {
                id: "p2".into(),
                identifiers: vec![],
            },
        ]
    }

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
    fn jsonl_files_hold_one_member_per_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write_batch(
            &dir.path().join("out"),
            "b.jsonl",
            FileFormat::Jsonl,
            Op::Add,
            &members(),
        )
        .expect("write");
        let text = std::fs::read_to_string(path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines[0]["op"], "add");
        assert_eq!(lines[0]["identifiers"][1]["sha256"], "cd");
        assert_eq!(
            lines[1],
            serde_json::json!({"op": "add", "id": "p2", "identifiers": []})
        );
        let leftovers = std::fs::read_dir(dir.path().join("out"))
            .expect("ls")
            .count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }

    #[test]
    fn csv_files_hold_one_identifier_per_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write_batch(dir.path(), "b.csv", FileFormat::Csv, Op::Remove, &members())
            .expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            "op,id,kind,sha256\nremove,p1,email,ab\nremove,p1,phone,cd\nremove,p2,,\n"
        );
        // Written again (a batch resent after a crash), it replaces itself.
        write_batch(dir.path(), "b.csv", FileFormat::Csv, Op::Remove, &members()).expect("again");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}
