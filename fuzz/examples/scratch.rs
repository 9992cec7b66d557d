fn main() {
    for (target, name, bytes) in crewdesk_fuzz::seeds() {
        if target == "sync_message" {
            let v = crewdesk_fuzz::sync_message_verdict(&bytes);
            println!("{name}: {:?}", v.map(|v| (v.accepted.len(), v.refused.map(|r| r.1 .0), v.missing.len())));
        } else {
            crewdesk_fuzz::run(target, &bytes);
            println!("{target}/{name} ok");
        }
    }
}
