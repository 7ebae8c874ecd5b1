/**
 * What an NBD connection serves, and how the server finds it (issue 9).
 *
 * The server (nbd-server.ts) knows nothing about mounts or the catalog: when a
 * client names an export (NBD_OPT_GO / INFO / EXPORT_NAME) it asks an injected
 * `NbdExportResolver`, passing the name and the address the client connects
 * from. The appliance's mount manager is the resolver in production: it answers
 * only names it handed out, only to the address it handed them to, only while
 * the mount lives. Tests resolve a fixed name.
 *
 * Contract of an NbdExport:
 * - `size` never changes while connections are open; offsets are checked by the
 *   session before any call (0 ≤ offset, offset + length ≤ size).
 * - `read` returns segments covering exactly [offset, offset+length) in order.
 * - `runs` reports data/zero runs for base:allocation (a hole is a run of zeros
 *   the client may skip); at most maxRuns runs, the last may stop short.
 * - A writable export (readOnly false) implements write/zero/flush; writes land
 *   in the export's copy-on-write overlay, never in the image. `flush` returns
 *   only after every write acknowledged before it is durable.
 * - `canMultiConn` is true only when every connection to the export sees the
 *   others' writes once they are flushed (one shared overlay object per export).
 * - `release` is called once for every time the resolver returned the export
 *   to a session: when the connection ends for GO / EXPORT_NAME (after its
 *   running requests), right after the answer for INFO and LIST_/
 *   SET_META_CONTEXT (which name an export but do not keep it). A resolver
 *   counting connections counts resolves minus releases.
 * - `revoked`, when given, is aborted when the export is withdrawn (its mount
 *   removed): every connection serving it is closed at once (requests still
 *   running get no reply; the client sees the connection end), and a GO for
 *   an export already revoked closes too. `release` still follows.
 */
import type { Segment } from './image-source.js';

export interface NbdRun { length: number; zero: boolean }

export interface NbdExport {
  readonly size: number;
  /** Preferred block size advertised to clients (the chunk size). */
  readonly chunkSize: number;
  readonly readOnly: boolean;
  readonly canMultiConn: boolean;
  read(offset: number, length: number): Promise<Segment[]>;
  runs(offset: number, length: number, maxRuns: number): Promise<NbdRun[]>;
  write?(offset: number, data: Buffer): Promise<void>;
  /** WRITE_ZEROES (trim false) and TRIM (trim true): the range reads as zeros afterwards. */
  zero?(offset: number, length: number, opts: { trim: boolean }): Promise<void>;
  flush?(): Promise<void>;
  release?(): void;
  /** Aborted when the export is withdrawn: its connections are closed. */
  readonly revoked?: AbortSignal;
}

export interface NbdPeer {
  /** Remote IP address of the TCP connection, as net.Socket.remoteAddress gives it. */
  address: string;
}

/** undefined: no such export for this peer (the session answers ERR_UNKNOWN and serves nothing). */
export type NbdExportResolver = (name: string, peer: NbdPeer) => Promise<NbdExport | undefined>;
