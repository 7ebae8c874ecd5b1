/**
 * The agent's side of an instant mount (issue 9, item 4), as a port: the
 * session/CLI layer obtains a grant from the appliance (an NBD export per
 * volume of the image or image set) and hands it to a LocalMounter, which
 * attaches each export as a block device, mounts its filesystem, prepares the
 * PostgreSQL data directory and starts PostgreSQL.
 *
 * Contract of a LocalMounter:
 * - `mount` either returns a running PostgreSQL that answered a query, or
 *   throws a BlocksnapError after releasing every step it had done (no FUSE
 *   mount, loop device, filesystem mount or postmaster left).
 * - Every step is recorded durably before it is taken, so `cleanupOrphans`
 *   (run on every agent start) releases what a killed agent left, and only that.
 * - `unmount` reverses every step (stop PostgreSQL, unmount, detach, end the
 *   NBD connection); unmounting an unknown id is E_NOT_FOUND.
 */
export interface MountGrantExport {
  volume: string;
  imageId: string;
  /** nbd://host:port/EXPORTNAME (or nbds:// with TLS), as libnbd clients take it. */
  uri: string;
  size: number;
  chunkSize: number;
  /** The image's PostgreSQL part (label, tablespace map, stop LSN, timeline, version, WAL names), if app-consistent. */
  pg?: MountPgInfo;
}

export interface MountPgInfo {
  labelFile: string;
  spcmapFile: string;
  stopLsn: string;
  timeline: number;
  serverVersion: number;
  role: string;
  /** WAL segment names the image needs beyond what it holds (fetched through WalSource). */
  wal: string[];
}

export interface MountGrant {
  mountId: string;
  /** Image id, or image set id for a consistency group. */
  imageId: string;
  expiresAt?: string;
  writable: boolean;
  exports: MountGrantExport[];
}

/** Fetches a WAL segment (plain bytes, digest-checked by the implementation) the image needs. */
export type WalSource = (imageId: string, name: string) => Promise<Buffer>;

export interface LocalMountOptions {
  /** PostgreSQL port for the mounted copy (default: a free port). */
  pgPort?: number;
  /** Directory to mount under (default: under the agent's state dir). */
  target?: string;
  asStandby?: boolean;
}

export interface LocalMount {
  mountId: string;
  imageId: string;
  target: string;
  dataDir: string;
  pgPort: number;
  /** libpq connection string of the running copy. */
  connection: string;
  /** From the start of `mount` to the first answered query. */
  secondsToFirstQuery: number;
}

export interface LocalMounter {
  mount(grant: MountGrant, wal: WalSource, opts: LocalMountOptions): Promise<LocalMount>;
  unmount(mountId: string): Promise<void>;
  list(): Promise<LocalMount[]>;
  cleanupOrphans(): Promise<string[]>;
}
