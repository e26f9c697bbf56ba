use super::{Cmd, Item, Replay, Seen};
use crate::delivery::records::tests::{envelope, head};
use crate::delivery::records::{self, OutHead};
use crate::delivery::testing::{rows, start_node, wait_until, write_before_start};
use crate::store::tables::{OUT_MESSAGES, OUTBOX, RECEIPT_BATCHES, RECEIPTS_OUT};
use crate::wire::{self, Envelope, Receipt, ReceiptKind};

/// A database written by schema 3 holds each queued message twice: its
/// envelope row and an outbox index row. This build queues from the
/// envelope rows alone and empties the index at start.
#[tokio::test]
async fn queued_messages_replay_from_their_envelopes_and_the_old_index_is_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let now = crate::time::now_ms();
    let ids: Vec<String> = (0..3)
        .map(|i| format!("01KB00000000000000000000A{i}"))
        .collect();
    {
        let (queued, peer) = (ids.clone(), peer.clone());
        write_before_start(dir.path(), move |txn| {
            let mut msgs = txn.open_table(OUT_MESSAGES)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            for id in &queued {
                let env = Envelope {
                    id: id.clone(),
                    created_at_ms: now,
                    expires_at_ms: now + 3_600_000,
                    ..envelope()
                };
                let head = OutHead {
                    to_node: peer.clone(),
                    ..head()
                };
                let bytes = wire::encode(&env);
                msgs.insert(
                    id.as_str(),
                    records::encode_outgoing(&head, &bytes).as_slice(),
                )?;
                outbox.insert((peer.as_str(), id.as_str()), (now + 3_600_000, 100))?;
            }
            // An index row whose envelope is gone (handed over by an
            // older build's last transaction) queues nothing.
            outbox.insert((peer.as_str(), "01KB00000000000000000000ZZ"), (now, 1))?;
            Ok(())
        })
        .await;
    }
    let node = start_node(dir.path()).await;
    let h = node.handle();
    wait_until(
        "the index emptied and every message queued",
        20,
        || async {
            let (messages, _) = h.delivery().backlog().await.unwrap();
            (rows(&h, OUTBOX) == 0 && messages == ids.len()).then_some(())
        },
        || format!("index rows left: {} (want 0)", rows(&h, OUTBOX)),
    )
    .await;
    // The envelopes are still stored: they are the outbox now.
    let stored = rows(&h, OUT_MESSAGES);
    assert_eq!(stored as usize, ids.len());
    drop(h);
    node.shutdown().await;
}

/// A database written by schema 4 holds a row per receipt in
/// `RECEIPTS_OUT`. A start moves them into a row per sender node, in
/// their order, and queues those rows; a row that does not decode stays.
#[tokio::test]
async fn receipts_of_schema_4_move_into_a_row_per_node_and_are_queued() {
    let dir = tempfile::tempdir().unwrap();
    let node_of = || {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_string()
    };
    let (p, q) = (node_of(), node_of());
    let receipt = |i: u32| Receipt {
        message_id: format!("01KB00000000000000000000R{i}"),
        kind: ReceiptKind::DeadLetter { deliveries: i },
        at_ms: 5,
    };
    {
        let (p, q) = (p.clone(), q.clone());
        write_before_start(dir.path(), move |txn| {
            let mut t = txn.open_table(RECEIPTS_OUT)?;
            for (node, i) in [(&p, 1), (&q, 2), (&p, 3), (&p, 4)] {
                let rc = receipt(i);
                t.insert(
                    (node.as_str(), rc.message_id.as_str()),
                    wire::encode(&rc).as_slice(),
                )?;
            }
            t.insert(
                (p.as_str(), "01KB00000000000000000000R9"),
                b"\xff".as_slice(),
            )?;
            Ok(())
        })
        .await;
    }
    let node = start_node(dir.path()).await;
    let h = node.handle();
    wait_until(
        "the old rows moved and queued",
        20,
        || async {
            let (_, queued) = h.delivery().backlog().await.unwrap();
            (rows(&h, RECEIPTS_OUT) == 1 && queued == 2).then_some(())
        },
        || format!("old rows left: {} (want 1)", rows(&h, RECEIPTS_OUT)),
    )
    .await;
    let mut by_node = Vec::new();
    {
        let r = h.store().read().unwrap();
        let t = r.open_table(RECEIPT_BATCHES).unwrap();
        for row in t.iter().unwrap() {
            let (k, v) = row.unwrap();
            let got: Vec<Receipt> = records::decode("receipt_batches", v.value()).unwrap();
            by_node.push((k.value().0.to_string(), got));
        }
    }
    by_node.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = vec![
        (p.clone(), vec![receipt(1), receipt(3), receipt(4)]),
        (q.clone(), vec![receipt(2)]),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(by_node, want);
    drop(h);
    node.shutdown().await;
}

fn item(id: &str) -> Item {
    Item {
        id: id.to_string(),
        expires_at_ms: u64::MAX,
        size: 1,
        env: None,
    }
}

fn ids(cmd: &Cmd) -> Vec<String> {
    match cmd {
        Cmd::Enqueue(v) | Cmd::Receipts(v) => v.iter().map(|(_, i)| i.id.clone()).collect(),
        _ => Vec::new(),
    }
}

/// Sends during the start's scan of the outbox are queued once, whether
/// or not the scan found them too; receipts likewise, each kind apart.
#[test]
fn what_the_scan_queued_is_not_queued_again_by_commands_that_waited_for_it() {
    let peer = libp2p::PeerId::random();
    let replay = Replay {
        messages: vec![(peer, item("m1")), (peer, item("m2"))],
        receipts: vec![(peer, item("r1"))],
    };
    let deferred = vec![
        Cmd::Enqueue(vec![(peer, item("m2")), (peer, item("m3"))]),
        Cmd::Receipts(vec![(peer, item("r1")), (peer, item("m1"))]),
        Cmd::PeerUp(peer),
    ];
    let seen = Seen::of(&replay, &deferred);
    let kept: Vec<Vec<String>> = deferred
        .into_iter()
        .map(|c| ids(&seen.without_replayed(c)))
        .collect();
    assert_eq!(
        kept,
        vec![vec!["m3".to_string()], vec!["m1".to_string()], Vec::new()]
    );
    // Nothing deferred that queues: no id set is built.
    let seen = Seen::of(&replay, &[Cmd::PeerUp(peer)]);
    assert!(seen.messages.is_empty() && seen.receipts.is_empty());
}
