// An unmodified automerge-repo client: finds a Crewdesk conversation on the relay, prints its
// messages, appends a message from the token's agent in the conversation's layout, and exits once
// the relay's advertised heads cover the change (the relay only advertises what it has stored).
// Usage: node append.mjs ws://127.0.0.1:PORT/?token=TOKEN <documentId> <messageId> <text> <agentId>
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const [url, documentId, messageId, text, agent] = process.argv.slice(2)
const repo = new Repo({ network: [new WebSocketClientAdapter(url)] })
const fail = (e) => { console.error("interop failed:", e?.message ?? e); process.exit(1) }
setTimeout(() => fail(new Error("timeout")), 20_000)

try {
  const handle = await repo.find(`automerge:${documentId}`)
  const doc = handle.doc()
  const texts = Object.values(doc.messages).sort((a, b) => a.at - b.at || (a.id < b.id ? -1 : 1)).map((m) => m.body.text)
  console.log("messages:", JSON.stringify(texts))
  handle.change((d) => {
    d.room[agent] = true // join, then write: messages come from agents in the room
    d.messages[messageId] = { id: messageId, at: Date.now(), author: { kind: "crew", agent }, body: { kind: "text", text } }
  })
  const storageId = repo.getStorageIdOfPeer(repo.peers[0])
  const same = (a, b) => a && b && a.length === b.length && [...a].sort().join() === [...b].sort().join()
  await new Promise((resolve) => {
    const check = () => { if (same(handle.getSyncInfo(storageId)?.lastHeads, handle.heads())) resolve() }
    handle.on("remote-heads", check)
    check()
  })
  console.log("synced")
  await repo.shutdown()
  process.exit(0)
} catch (e) {
  fail(e)
}
