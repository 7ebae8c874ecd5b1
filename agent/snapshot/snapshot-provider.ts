/**
 * Takes point-in-time snapshots of a volume (reflink clone of a file-backed
 * volume here, LVM later).
 *
 * Contract:
 * - `create` returns only when the snapshot is complete and readable at
 *   `Snapshot.path`; if it throws, nothing is left behind (no snapshot, no
 *   frozen filesystem). `freezeSeconds` is the time the volume's filesystem
 *   was frozen (0 if the mechanism needs no freeze).
 * - `remove` is idempotent: removing a missing snapshot succeeds.
 * - `cleanupStale` removes every snapshot this provider created that is not
 *   in `keep` and thaws a filesystem left frozen by a killed process; it
 *   returns what it released. It is called at agent start.
 * - `proveIdentity` (volume-identity.ts) proves the volume's device, backing
 *   store and mountpoint are one volume, or rejects E_IDENTITY naming the
 *   mismatch; it holds and changes nothing. Called at agent start and before
 *   every job, before anything is quiesced or frozen.
 */
import type { VolumeIdentityCheck } from './volume-identity.js';

export interface VolumeSpec {
  name: string;
  /** The block device the filesystem lives on (loop device). */
  device: string;
  /** Backing image file of a file-backed volume (reflink provider). */
  image?: string;
  /** Where the volume's filesystem is mounted (frozen during the snapshot). */
  mountpoint: string;
  chunkSize: number;
}

export interface Snapshot {
  id: string;
  volume: string;
  /** A file or device path that reads as the volume at the snapshot instant. */
  path: string;
  createdAt: Date;
  freezeSeconds: number;
  snapshotSeconds: number;
}

export interface SnapshotProvider extends VolumeIdentityCheck {
  readonly kind: string;
  create(volume: VolumeSpec, tag: string): Promise<Snapshot>;
  /**
   * Snapshots several volumes at one instant (a consistency group), with
   * `create`'s contract for the whole set: all or nothing. Optional: a
   * provider without it cannot back up groups of more than one volume.
   */
  createGroup?(volumes: VolumeSpec[], tag: string): Promise<Snapshot[]>;
  remove(snapshot: Snapshot): Promise<void>;
  list(): Promise<Snapshot[]>;
  cleanupStale(keep?: Set<string>): Promise<string[]>;
}
