import type { Transport } from '../proto/transport.js';
import type { LocalMounter } from './mount/mount-port.js';
import type { Tracker } from './cbt/tracker.js';
import type { QuiescerFactory } from './pg/quiescer.js';
import type { SnapshotProvider, VolumeSpec } from './snapshot/snapshot-provider.js';

/**
 * What the agent is built from (DESIGN.md §7): its ports, composed by the CLI
 * (agent/compose.ts) or a test fixture. agent.ts and everything below it
 * name only these interfaces, never an implementation.
 */
export interface AgentPorts {
  provider: SnapshotProvider;
  /** Changed-block tracking; null: incrementals compare digests. */
  tracker: TrackerPort | null;
  /** What quiesces the database around each snapshot; null: crash-consistent images. */
  quiescer: QuiescerPort | null;
  /** Opens a connection to the appliance. */
  dial: Dialer;
  /** Instant mount's local steps (agent/mount/); null or absent: `mount` is refused. */
  mounter?: LocalMounter | null;
}

/** Makes one Tracker per volume, and releases what an earlier (killed) run of its kind left. */
export interface TrackerPort {
  readonly kind: string;
  /** Returns what it released (names for the log / `cleanup`); never throws for "nothing to do". */
  cleanupStale(): Promise<string[]>;
  create(volume: VolumeSpec): Tracker;
}

/** A Quiescer per capture window, and the release of what a killed earlier run left held. */
export interface QuiescerPort {
  readonly factory: QuiescerFactory;
  /** Resumes/stops what an earlier run left held; returns what it did. */
  releaseStale(): Promise<{ found: boolean; actions: string[] }>;
}

export type Dialer = (url: string, opts: { ca?: Buffer; insecure: boolean }) => Promise<Transport>;
