//! A member as an export sends it, encoded once when the person changes
//! instead of assembled from four tables on every export.
//!
//! Each person's document is the `AudienceMember` an export sends, stored
//! framed as an entry of `ExportAudienceResponse.members` (field 1: key,
//! length, message). The database concatenating a page's documents in id
//! order therefore produces the page's encoded response, which the service
//! sends as it is (`ExportAudienceResponse::encoded`) without decoding a
//! member. [`KEY`](key) names what the documents were built with; a stored
//! key that differs makes the projection rebuild every document
//! (`Projection::prepare_export_docs`).

use madtech_proto::segments::v1 as pb;
use prost::Message;

use super::Member;
use crate::convert::{member_from_pb, member_to_pb};

/// Bump when what a document holds changes: documents written under
/// another key are rebuilt at start. (2: the `AudienceMember` wire form;
/// 1 was a private message.)
const FORMAT: u32 = 2;

/// The field of `ExportAudienceResponse` that holds its members.
const MEMBERS_FIELD: u32 = 1;

/// What the stored documents were built with: the format and the trait
/// read as a birth date (configuration that can change between starts).
pub(super) fn key(birth_date_trait: &str) -> String {
    format!("{FORMAT}:{birth_date_trait}")
}

/// `member`'s stored document.
pub(super) fn encode(member: Member) -> Vec<u8> {
    let member = member_to_pb(member);
    let mut framed = Vec::with_capacity(member.encoded_len() + 6);
    prost::encoding::message::encode(MEMBERS_FIELD, &member, &mut framed);
    framed
}

/// The members of a page of concatenated documents, in their order.
pub(super) fn decode_page(page: &[u8]) -> Result<Vec<Member>, prost::DecodeError> {
    let page = pb::ExportAudienceResponse::decode(page)?;
    Ok(page.members.into_iter().map(member_from_pb).collect())
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
        let page: Vec<u8> = members.iter().cloned().flat_map(encode).collect();
        assert_eq!(decode_page(&page).expect("a page"), members);
        assert_eq!(decode_page(&[]).expect("an empty page"), Vec::new());
    }

    #[test]
    fn a_cut_page_is_an_error_not_a_panic() {
        let page = encode(member("a", None));
        assert!(decode_page(&page[..page.len() - 3]).is_err());
    }

    #[test]
    fn a_page_sent_as_it_is_decodes_as_its_members_at_the_receiver() {
        let members = vec![member("a", Some("1990-01-31")), member("b", None)];
        let page: Vec<u8> = members.iter().cloned().flat_map(encode).collect();
        let sent = pb::ExportAudienceResponse::encoded(page.into()).encode_to_vec();
        let received = pb::ExportAudienceResponse::decode(sent.as_slice()).expect("a page");
        let expected: Vec<_> = members.into_iter().map(member_to_pb).collect();
        assert_eq!(received.members, expected);
    }

    #[test]
    fn the_key_changes_with_the_birth_date_trait() {
        assert_ne!(key("birthdate"), key("date_of_birth"));
    }
}
