//! A member as an export sends it, encoded once when the person changes
//! instead of assembled from four tables on every export.
//!
//! Each person's document is stored framed as field 1 of [`PageDoc`] (key,
//! length, body), so the database concatenating a page's documents in id
//! order produces an encoded `PageDoc`: the export decodes one buffer per
//! page and never moves rows one by one. The format is private to the
//! projection; [`KEY`] names it, and a stored key that differs makes the
//! projection rebuild every document (`Projection::prepare_export_docs`).

use prost::Message;

use super::Member;

/// Bump when the fields below change: documents written under another key
/// are rebuilt at start.
const FORMAT: u32 = 1;

/// What the stored documents were built with: the format and the trait
/// read as a birth date (configuration that can change between starts).
pub(super) fn key(birth_date_trait: &str) -> String {
    format!("{FORMAT}:{birth_date_trait}")
}

#[derive(Clone, PartialEq, prost::Message)]
struct MemberDoc {
    #[prost(string, tag = "1")]
    profile_id: String,
    #[prost(string, tag = "2")]
    region: String,
    #[prost(message, repeated, tag = "3")]
    identifiers: Vec<IdentifierDoc>,
    #[prost(string, repeated, tag = "4")]
    merged_ids: Vec<String>,
    #[prost(string, optional, tag = "5")]
    birth_date: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct IdentifierDoc {
    #[prost(string, tag = "1")]
    kind: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// A page: the concatenation of its members' stored documents.
#[derive(Clone, PartialEq, prost::Message)]
struct PageDoc {
    #[prost(message, repeated, tag = "1")]
    members: Vec<MemberDoc>,
}

/// `member`'s stored document.
pub(super) fn encode(member: &Member) -> Vec<u8> {
    let doc = MemberDoc {
        profile_id: member.profile_id.clone(),
        region: member.region.clone(),
        identifiers: member
            .identifiers
            .iter()
            .map(|(kind, value)| IdentifierDoc {
                kind: kind.clone(),
                value: value.clone(),
            })
            .collect(),
        merged_ids: member.merged_ids.clone(),
        birth_date: member.birth_date.clone(),
    };
    let mut framed = Vec::with_capacity(doc.encoded_len() + 6);
    prost::encoding::message::encode(1, &doc, &mut framed);
    framed
}

/// The members of a page of concatenated documents, in their order.
pub(super) fn decode_page(page: &[u8]) -> Result<Vec<Member>, prost::DecodeError> {
    let page = PageDoc::decode(page)?;
    Ok(page
        .members
        .into_iter()
        .map(|doc| Member {
            profile_id: doc.profile_id,
            region: doc.region,
            identifiers: doc
                .identifiers
                .into_iter()
                .map(|identifier| (identifier.kind, identifier.value))
                .collect(),
            merged_ids: doc.merged_ids,
            birth_date: doc.birth_date,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, birth_date: Option<&str>) -> Member {
        Member {
            profile_id: id.into(),
            region: "FR".into(),
            identifiers: vec![
                ("email".into(), format!("{id}@example.com")),
                ("phone".into(), "+33612345678".into()),
            ],
            merged_ids: vec![format!("{id}-old")],
            birth_date: birth_date.map(Into::into),
        }
    }

    #[test]
    fn concatenated_documents_decode_as_a_page() {
        let members = vec![
            member("a", Some("1990-01-31")),
            member("b", None),
            Member {
                profile_id: "c".into(),
                region: String::new(),
                identifiers: Vec::new(),
                merged_ids: Vec::new(),
                birth_date: None,
            },
        ];
        let page: Vec<u8> = members.iter().flat_map(encode).collect();
        assert_eq!(decode_page(&page).expect("a page"), members);
        assert_eq!(decode_page(&[]).expect("an empty page"), Vec::new());
    }

    #[test]
    fn a_cut_page_is_an_error_not_a_panic() {
        let page = encode(&member("a", None));
        assert!(decode_page(&page[..page.len() - 3]).is_err());
    }

    #[test]
    fn the_key_changes_with_the_birth_date_trait() {
        assert_ne!(key("birthdate"), key("date_of_birth"));
    }
}
