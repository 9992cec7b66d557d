// The reference automerge-repo sync server (as automerge-repo-sync-server sets it up: Repo with
// the WebSocket server adapter, Node filesystem storage, share policy "never announce"), bound to
// loopback for the relay benchmark. Usage: node reference-server.mjs <port> <data dir>
import http from "node:http"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [port, dir] = process.argv.slice(2)
const wss = new WebSocketServer({ noServer: true })
new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: "reference-sync-server",
  sharePolicy: async () => false,
})
const server = http.createServer((_req, res) => res.end("ok"))
server.on("upgrade", (req, socket, head) => wss.handleUpgrade(req, socket, head, (ws) => wss.emit("connection", ws, req)))
server.listen(Number(port), "127.0.0.1", () => console.log("LISTENING", port))
