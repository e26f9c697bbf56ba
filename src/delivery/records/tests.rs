use super::*;

fn p() -> Progress {
    Progress::queued(1)
}

#[test]
fn status_only_moves_forward() {
    let mut t = p();
    assert!(t.advance(Status::Sent, 2, None));
    assert!(t.advance(Status::Delivered, 3, None));
    assert!(!t.advance(Status::Sent, 4, None), "no going back");
    assert!(t.advance(Status::Processed, 5, None));
    assert!(!t.advance(Status::Expired, 6, None), "final stays final");
    assert_eq!(t.history.len(), 4);
    assert_eq!(t.status, Status::Processed);
}

#[test]
fn receipt_may_overtake_the_delivery_answer() {
    let mut t = p();
    assert!(t.advance(Status::Processed, 5, None));
    assert!(!t.advance(Status::Delivered, 4, None));
    assert_eq!(t.status, Status::Processed);
}

#[test]
fn history_is_bounded() {
    let mut t = p();
    for i in 0..100 {
        t.status = Status::Queued;
        t.advance(Status::Sent, i, None);
    }
    assert!(t.history.len() <= MAX_HISTORY);
    assert_eq!(
        t.history[0].status,
        Status::Queued,
        "the first entry is kept"
    );
}

#[test]
fn schema_2_status_rows_still_decode() {
    let old = wire::encode(&ProgressV2 {
        status: Status::Delivered,
        attempts: 2,
        updated_at_ms: 7,
        history: Vec::new(),
        last_error: Some("slow".into()),
        result_json: None,
    });
    let p = Progress::decode(&old).unwrap();
    assert_eq!(
        (p.status, p.attempts, p.summary.clone()),
        (Status::Delivered, 2, None)
    );
    let mut now = p.clone();
    now.summary = Some(summary());
    assert_eq!(Progress::decode(&wire::encode(&now)).unwrap(), now);
    let err = Progress::decode(&old[..old.len() - 1]).unwrap_err();
    assert!(err.to_string().contains("out_status"), "{err}");
}

/// A sent envelope (a fresh sender key each call).
pub(crate) fn envelope() -> Envelope {
    let k = crate::identity::generate_key().unwrap();
    let id = AgentId::from_public(&k.verifying_key().to_bytes());
    Envelope {
        id: "m1".into(),
        from: id.clone(),
        from_handle: "alice".into(),
        to: id,
        subject: Some("hi".into()),
        body_json: "{}".into(),
        reply_to: Some("m0".into()),
        created_at_ms: 1,
        expires_at_ms: 100,
        trace_id: "t".into(),
        delegation_json: None,
    }
}

/// Where [`envelope`] went.
pub(crate) fn head() -> OutHead {
    OutHead {
        to_handle: "bob".into(),
        to_node: "node".into(),
    }
}

/// Store `env`, sent as [`head`] says, as queued message `id`.
pub(crate) async fn store_outgoing(store: &crate::store::Store, id: &'static str, env: &Envelope) {
    let rec = encode_outgoing(&head(), &wire::encode(env));
    store
        .write(move |txn| {
            txn.open_table(crate::store::tables::OUT_MESSAGES)?
                .insert_new(id, rec.as_slice())
        })
        .await
        .unwrap();
}

/// Whether message `id`'s envelope row is stored.
fn envelope_stored(store: &crate::store::Store, id: &str) -> bool {
    let r = store.read().unwrap();
    let t = r.open_table(crate::store::tables::OUT_MESSAGES).unwrap();
    t.get(id).unwrap().is_some()
}

fn summary() -> Summary {
    Summary::of(&envelope(), &head())
}

#[tokio::test]
async fn handing_over_moves_the_summary_and_drops_the_envelope() {
    use crate::store::{Store, tables::OUT_MESSAGES};
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    let env = envelope();
    store_outgoing(&store, "m1", &env).await;
    let p = store
        .write(|txn| {
            let mut msgs = txn.open_table(OUT_MESSAGES)?;
            let mut p = Progress::queued(1);
            p.advance(Status::Delivered, 2, None);
            hand_over(&mut msgs, "m1", &mut p, None)?;
            assert!(msgs.get("m1")?.is_none(), "the envelope is gone");
            // Again: nothing more happens, the summary stays.
            hand_over(&mut msgs, "m1", &mut p, None)?;
            Ok(p)
        })
        .await
        .unwrap();
    assert_eq!(p.summary, Some(Summary::of(&env, &head())));
    assert!(!envelope_stored(&store, "m1"));
}

#[tokio::test]
async fn handing_over_a_known_summary_writes_what_a_cloned_one_would() {
    use crate::store::{Store, tables::OUT_MESSAGES, tables::OUT_STATUS};
    let dir = tempfile::tempdir().unwrap();
    let (store, _w) = Store::open(dir.path()).unwrap();
    let env = envelope();
    let known = Summary::of(&env, &head());
    store_outgoing(&store, "m1", &env).await;
    let mut p = Progress::queued(1);
    p.advance(Status::Delivered, 2, Some("why".into()));
    p.result_json = Some("{}".into());
    let (written, summary) = (p.clone(), known.clone());
    store
        .write(move |txn| {
            let mut t = super::StatusTables::open(txn)?;
            let mut msgs = txn.open_table(OUT_MESSAGES)?;
            hand_over_and_write(&mut t, &mut msgs, "m1", &written, &summary)
        })
        .await
        .unwrap();
    assert!(!envelope_stored(&store, "m1"));
    let r = store.read().unwrap();
    let t = r.open_table(OUT_STATUS).unwrap();
    let stored = t.get("m1").unwrap().unwrap();
    p.summary = Some(known);
    // The route layout: shorter than the whole summary, and read back
    // whole; the route is stored once, apart.
    assert_eq!(stored.value()[0], crate::delivery::routes::TAG);
    assert!(stored.value().len() < wire::encode(&p).len());
    assert_eq!(Progress::decode(stored.value()).unwrap(), p);
    let routes = r.open_table(crate::store::tables::OUT_ROUTES).unwrap();
    assert_eq!(routes.len().unwrap(), 1);
}

#[test]
fn a_progress_read_with_its_summary_borrowed_writes_back_the_same_bytes() {
    let mut p = Progress::queued(1);
    p.advance(Status::Delivered, 2, Some("why".into()));
    p.summary = Some(summary());
    let stored = wire::encode(&p);
    let mut b = Progress::borrowed(&stored).unwrap();
    assert_eq!(wire::encode(&b), stored);
    assert_eq!(b.summary.as_ref().unwrap().to_node, "node");
    // Advanced the same way, both write the same record.
    b.advance(Status::Processed, 3, None);
    p.advance(Status::Processed, 3, None);
    assert_eq!(wire::encode(&b), wire::encode(&p));
    // Without a summary (not handed over yet) it is not read this way.
    p.summary = None;
    assert!(Progress::borrowed(&wire::encode(&p)).is_none());
    assert!(Progress::borrowed(b"garbage").is_none());
}

#[test]
fn outgoing_record_splits_into_head_and_envelope() {
    let k = crate::identity::generate_key().unwrap();
    let id = AgentId::from_public(&k.verifying_key().to_bytes());
    let env = Envelope {
        id: "x".into(),
        from: id.clone(),
        from_handle: "a".into(),
        to: id,
        subject: None,
        body_json: "{}".into(),
        reply_to: None,
        created_at_ms: 1,
        expires_at_ms: 100,
        trace_id: "x".into(),
        delegation_json: None,
    };
    let head = OutHead {
        to_handle: "bob".into(),
        to_node: "node".into(),
    };
    let bytes = wire::encode(&env);
    let rec = encode_outgoing(&head, &bytes);
    let (h, raw) = split_outgoing(&rec).unwrap();
    assert_eq!((h, raw), (head.clone(), bytes.as_slice()));
    assert_eq!(decode_outgoing(&rec).unwrap(), (head.clone(), env.clone()));
    let t = Tracking::from_parts(&Summary::of(&env, &head), None);
    assert_eq!((t.status, t.history.len()), (Status::Queued, 1));
    assert_eq!((t.to_handle.as_str(), t.expires_at_ms), ("bob", 100));
    // Damaged records are errors naming the table, never panics.
    for bad in [&rec[..2], &rec[..6], &[255, 255, 255, 255, 0][..]] {
        let err = split_outgoing(bad).unwrap_err();
        assert!(err.to_string().contains("out_messages"), "{err}");
    }
}
