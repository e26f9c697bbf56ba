//! Upgrades of older database layouts, run when the database is opened,
//! inside the transaction that records the new schema version.

use redb::{ReadableTable, WriteTransaction};

use super::Error;
use super::tables::{OUT_MESSAGES, OUT_STATUS};
use crate::delivery::records::{self, OutHead, Progress, Tracking};

/// Rows moved per pass (bounds the memory an upgrade needs).
const CHUNK: usize = 4096;

/// Schema 1 → 2: a sent message's `OUT_MESSAGES` row held the bare envelope
/// and its `OUT_STATUS` row a full `Tracking`. Now the envelope row starts
/// with the routing head (`records::encode_outgoing`) and the status row
/// holds only the `Progress`. Returns the messages converted.
pub(super) fn v1_to_v2(txn: &WriteTransaction) -> Result<usize, Error> {
    let mut msgs = txn.open_table(OUT_MESSAGES)?;
    let mut status = txn.open_table(OUT_STATUS)?;
    let mut after: Option<String> = None;
    let mut moved = 0;
    loop {
        let mut chunk: Vec<(String, Vec<u8>)> = Vec::with_capacity(CHUNK);
        let rows = match &after {
            Some(k) => msgs.range::<&str>((
                std::ops::Bound::Excluded(k.as_str()),
                std::ops::Bound::Unbounded,
            ))?,
            None => msgs.range::<&str>(..)?,
        };
        for row in rows.take(CHUNK) {
            let (k, v) = row?;
            chunk.push((k.value().to_string(), v.value().to_vec()));
        }
        let Some((last, _)) = chunk.last() else {
            return Ok(moved);
        };
        after = Some(last.clone());
        for (id, envelope) in chunk {
            let Some(old) = status.get(id.as_str())?.map(|v| v.value().to_vec()) else {
                // Schema 1 wrote both rows together; an envelope without
                // tracking cannot be routed, so it cannot be kept.
                msgs.remove(id.as_str())?;
                continue;
            };
            let t: Tracking = records::decode("out_status", &old)?;
            let head = OutHead {
                to_handle: t.to_handle,
                to_node: t.to_node,
            };
            msgs.insert(
                id.as_str(),
                records::encode_outgoing(&head, &envelope).as_slice(),
            )?;
            let progress: Progress = Progress {
                status: t.status,
                attempts: t.attempts,
                updated_at_ms: t.updated_at_ms,
                history: t.history,
                last_error: t.last_error,
                result_json: t.result_json,
                summary: None,
            };
            status.insert(id.as_str(), crate::wire::encode(&progress).as_slice())?;
            moved += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use redb::Database;

    use super::*;
    use crate::delivery::records::{HistoryEntry, Status};
    use crate::identity::AgentId;
    use crate::store::{DB_FILE, META, META_SCHEMA, SCHEMA_VERSION, Store, open_and_close};
    use crate::wire::{self, Envelope};

    fn envelope(id: &str) -> Envelope {
        let k = crate::identity::generate_key().unwrap();
        let a = AgentId::from_public(&k.verifying_key().to_bytes());
        Envelope {
            id: id.into(),
            from: a.clone(),
            from_handle: "alice".into(),
            to: a,
            subject: None,
            body_json: "{\"n\":1}".into(),
            reply_to: None,
            created_at_ms: 10,
            expires_at_ms: 1_000,
            trace_id: id.into(),
            delegation_json: None,
        }
    }

    #[test]
    fn schema_1_messages_are_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        open_and_close(dir.path());
        // Write what schema 1 wrote, and mark the file as schema 1.
        let envs: Vec<Envelope> = (0..(CHUNK + 3))
            .map(|i| envelope(&format!("m{i:06}")))
            .collect();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut meta = w.open_table(META).unwrap();
                meta.insert(META_SCHEMA, 1u32.to_le_bytes().as_slice())
                    .unwrap();
                let mut msgs = w.open_table(OUT_MESSAGES).unwrap();
                let mut status = w.open_table(OUT_STATUS).unwrap();
                for (i, env) in envs.iter().enumerate() {
                    let t = Tracking {
                        to: env.to.clone(),
                        to_handle: "bob".into(),
                        to_node: format!("node{i}"),
                        status: Status::Delivered,
                        attempts: 1,
                        created_at_ms: 10,
                        updated_at_ms: 20,
                        expires_at_ms: 1_000,
                        history: vec![HistoryEntry {
                            status: Status::Delivered,
                            at_ms: 20,
                            detail: None,
                        }],
                        last_error: None,
                        result_json: None,
                    };
                    msgs.insert(env.id.as_str(), wire::encode(env).as_slice())
                        .unwrap();
                    status
                        .insert(env.id.as_str(), wire::encode(&t).as_slice())
                        .unwrap();
                }
                // An envelope without tracking cannot be routed: dropped.
                msgs.insert("orphan", wire::encode(&envs[0]).as_slice())
                    .unwrap();
            }
            w.commit().unwrap();
        }
        let (s, w) = Store::open(dir.path()).unwrap();
        {
            let r = s.read().unwrap();
            let meta = r.open_table(META).unwrap();
            let v = meta.get(META_SCHEMA).unwrap().unwrap().value().to_vec();
            assert_eq!(v, SCHEMA_VERSION.to_le_bytes());
            let msgs = r.open_table(OUT_MESSAGES).unwrap();
            let status = r.open_table(OUT_STATUS).unwrap();
            assert!(msgs.get("orphan").unwrap().is_none());
            for (i, env) in envs.iter().enumerate() {
                let row = msgs.get(env.id.as_str()).unwrap().unwrap();
                let (head, got) = records::decode_outgoing(row.value()).unwrap();
                assert_eq!((head.to_handle.as_str(), got), ("bob", env.clone()));
                assert_eq!(head.to_node, format!("node{i}"));
                let p = Progress::decode(status.get(env.id.as_str()).unwrap().unwrap().value())
                    .unwrap();
                assert_eq!(
                    (p.status, p.attempts, p.updated_at_ms),
                    (Status::Delivered, 1, 20)
                );
            }
        }
        drop(s);
        w.join();
        // Opening again is a no-op: the file is the current schema now.
        open_and_close(dir.path());
    }
}
