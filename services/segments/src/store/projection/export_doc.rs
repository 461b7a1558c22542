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

use madtech_proto::segments::export_page;
use madtech_proto::segments::v1 as pb;
use prost::Message;

use super::Member;
use crate::convert::{member_from_pb, member_to_pb};

/// Bump when what a document holds changes: documents written under
/// another key are rebuilt at start. (2: the `AudienceMember` wire form;
/// 1 was a private message.)
const FORMAT: u32 = 2;

/// The field of `AudienceMember` that holds the profile id.
const PROFILE_ID_FIELD: u32 = 1;

/// What the stored documents were built with: the format and the trait
/// read as a birth date (configuration that can change between starts).
pub(super) fn key(birth_date_trait: &str) -> String {
    format!("{FORMAT}:{birth_date_trait}")
}

/// `member`'s stored document.
pub(super) fn encode(member: Member) -> Vec<u8> {
    let member = member_to_pb(member);
    let mut framed = Vec::with_capacity(member.encoded_len() + 6);
    export_page::encode_member(&member, &mut framed);
    framed
}

/// Walks a page of concatenated documents without decoding a member: the
/// number of members and the last profile id, checking that the ids
/// ascend from `after` (the order the page is sent in, which the database
/// promised only by the order it was fed in). Reads only each entry's
/// frame and its first field, the profile id, which is where prost puts
/// field 1.
pub(super) fn walk_page(mut page: &[u8], after: &str) -> Result<(u64, Option<String>), String> {
    use prost::encoding::{WireType, decode_key};
    let mut previous = after.as_bytes();
    let mut members = 0;
    while !page.is_empty() {
        let entry = match decode_key(&mut page) {
            Ok((export_page::MEMBERS_FIELD, WireType::LengthDelimited)) => {
                length_delimited(&mut page)?
            }
            _ => return Err("an export page holds something other than members".into()),
        };
        let mut fields = entry;
        let id = match decode_key(&mut fields) {
            Ok((PROFILE_ID_FIELD, WireType::LengthDelimited)) => length_delimited(&mut fields)?,
            _ => return Err("an export document does not start with its profile id".into()),
        };
        if id <= previous {
            return Err("an export page is not in profile id order".into());
        }
        previous = id;
        members += 1;
    }
    let last = (members > 0)
        .then(|| String::from_utf8(previous.to_vec()))
        .transpose()
        .map_err(|_| "a profile id in an export page is not UTF-8".to_string())?;
    Ok((members, last))
}

/// The value of a length-delimited field whose key was just read.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len =
        prost::encoding::decode_varint(buf).map_err(|err| format!("an export page: {err}"))?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > buf.len() {
        return Err("an export page is cut short".into());
    }
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Ok(value)
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
    fn a_walk_counts_members_and_finds_the_last_id_without_decoding() {
        let page: Vec<u8> = [member("a", None), member("b", Some("1990-01-31"))]
            .into_iter()
            .flat_map(encode)
            .collect();
        assert_eq!(walk_page(&page, ""), Ok((2, Some("b".to_string()))));
        assert_eq!(walk_page(&[], "x"), Ok((0, None)));
    }

    #[test]
    fn a_walk_refuses_pages_out_of_order_cut_or_foreign() {
        let ordered: Vec<u8> = [member("a", None), member("b", None)]
            .into_iter()
            .flat_map(encode)
            .collect();
        let reversed: Vec<u8> = [member("b", None), member("a", None)]
            .into_iter()
            .flat_map(encode)
            .collect();
        assert!(walk_page(&reversed, "").is_err());
        // Not after where the previous page ended.
        assert!(walk_page(&ordered, "a").is_err());
        assert!(walk_page(&ordered[..ordered.len() - 1], "").is_err());
        assert!(walk_page(&[0x10, 0x01], "").is_err());
        assert!(walk_page(&[0x0a, 0x02, 0x10, 0x01], "").is_err());
    }

    #[test]
    fn the_key_changes_with_the_birth_date_trait() {
        assert_ne!(key("birthdate"), key("date_of_birth"));
    }
}
