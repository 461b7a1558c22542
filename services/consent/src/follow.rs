//! Follows the profiles change stream for what consent must act on: merges
//! (the merged person's consent never widens). Resumes from the ledger's
//! stored cursor and reconnects with backoff after any failure.

use std::sync::Arc;

use futures::StreamExt;
use madtech_common::CancellationToken;
use madtech_common::changelog::{Backoff, keep_following};
use madtech_common::upstream::Upstream;
use madtech_proto::profiles::v1 as profiles_pb;
use profiles_pb::profile_change::Change;
use profiles_pb::profile_service_client::ProfileServiceClient;

use crate::error::ConsentError;
use crate::ledger::Ledger;

/// Changes read before the cursor is stored when none of them is a merge.
const PAGE: usize = 512;

/// Follows the stream until `shutdown`.
pub async fn follow(
    ledger: Arc<Ledger>,
    client: ProfileServiceClient<Upstream>,
    shutdown: CancellationToken,
) {
    keep_following("profile changes", shutdown, |backoff| {
        let (ledger, client) = (Arc::clone(&ledger), client.clone());
        async move { follow_once(&ledger, client, &backoff).await }
    })
    .await;
}

async fn follow_once(
    ledger: &Ledger,
    mut client: ProfileServiceClient<Upstream>,
    backoff: &Backoff,
) -> Result<(), ConsentError> {
    let after_cursor = ledger.profile_cursor().await?;
    let stream = client
        .watch_profile_changes(profiles_pb::WatchProfileChangesRequest { after_cursor })
        .await
        .map_err(ConsentError::Profiles)?
        .into_inner();
    let mut pages = stream.ready_chunks(PAGE);
    while let Some(page) = pages.next().await {
        let mut unstored = None;
        for item in page {
            let change = item.map_err(ConsentError::Profiles)?;
            let Some(change) = change.change else {
                continue;
            };
            match change.change {
                Some(Change::Merged(merged)) => {
                    ledger
                        .apply_merge(
                            change.cursor,
                            &merged.survivor_profile_id,
                            &merged.merged_profile_ids,
                        )
                        .await?;
                    unstored = None;
                }
                _ => unstored = Some(change.cursor),
            }
        }
        if let Some(cursor) = unstored {
            ledger.advance_profile_cursor(cursor).await?;
        }
        backoff.reset();
    }
    Ok(())
}
