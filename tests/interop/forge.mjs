// An unmodified automerge-repo client writing what the relay must refuse. Prints "refused" when the
// relay's heads never cover the forged change within a few seconds (and the relay said why), or
// "accepted" when they do; exits 0 either way, 1 on any other failure.
// Usage:
//   node forge.mjs ws://127.0.0.1:PORT/?token=TOKEN create <team> <agentId>
//     a new WhatsApp conversation whose first change carries a customer message, a message in
//     another agent's name ("ada") and that agent in the room
//   node forge.mjs ws://127.0.0.1:PORT/?token=TOKEN customer <documentId> <agentId>
//     a customer message appended to an existing conversation
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as A from "@automerge/automerge"
import { cbor } from "@automerge/automerge-repo/slim"

const [url, mode, target, agent] = process.argv.slice(2)
const adapter = new WebSocketClientAdapter(url)
const repo = new Repo({ network: [adapter] })
const fail = (e) => { console.error("interop failed:", e?.message ?? e); process.exit(1) }
setTimeout(() => fail(new Error("timeout")), 30_000)
// The adapter only logs the relay's error messages: read them off its socket.
let relayError = ""
const watchErrors = () =>
  adapter.socket?.addEventListener("message", (ev) => {
    try {
      const m = cbor.decode(new Uint8Array(ev.data))
      if (m.type === "error") relayError = m.message
    } catch {}
  })

const raw = (s) => new A.RawString(s)
const message = (id, author, text) => ({ id: raw(id), at: Date.now(), author, body: { kind: raw("text"), text } })

try {
  await new Promise((resolve) => adapter.once("peer-candidate", resolve))
  watchErrors()
  let handle
  if (mode === "create") {
    handle = repo.create()
    handle.change((d) => {
      d.schema = 1
      d.id = raw(handle.documentId)
      d.team = raw(target)
      d.channel = raw("whats_app")
      d.created_at = Date.now()
      d.customer = { id: raw("c-forged"), name: raw("Mallory"), email: null, phone: raw("15550100"), notes: null }
      d.messages = {
        "m-customer": message("m-customer", { kind: raw("customer") }, "Send the refund to this number"),
        "m-admin": message("m-admin", { kind: raw("crew"), agent: raw("ada") }, "Refund approved"),
      }
      d.room = { ada: true }
      d.grab_requests = {}
      d.closed_at = null
      d.owner = null
    })
    console.log("document:", handle.documentId)
  } else {
    handle = await repo.find(`automerge:${target}`)
    handle.change((d) => {
      d.room[agent] = true
      d.messages["m-forged"] = message("m-forged", { kind: raw("customer") }, "I approve my own refund")
    })
  }
  const storageId = () => repo.getStorageIdOfPeer(repo.peers[0])
  const same = (a, b) => a && b && a.length === b.length && [...a].sort().join() === [...b].sort().join()
  const covered = await new Promise((resolve) => {
    const check = () => { if (same(handle.getSyncInfo(storageId())?.lastHeads, handle.heads())) resolve(true) }
    handle.on("remote-heads", check)
    setTimeout(() => resolve(false), 5_000)
  })
  console.log(covered ? "accepted" : `refused: ${relayError}`)
  process.exit(0)
} catch (e) {
  fail(e)
}
