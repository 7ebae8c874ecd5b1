/**
 * Takes point-in-time snapshots of a volume (reflink clone of a file-backed
 * volume here, LVM later). Every implementation passes
 * test/agent/snapshot-provider.contract.ts; the fake one is
 * testing/fake-snapshot-provider.ts.
 *
 * Contract:
 * - `create(volume, tag)` returns only when the snapshot is complete and
 *   readable at `Snapshot.path`: that path reads as the whole volume (same
 *   size) at one instant between the call and its return, and later writes to
 *   the volume do not change it. Its id is `<volume>@<tag>`; a tag already
 *   used for that volume is refused and the existing snapshot is untouched.
 *   If it throws, nothing is left behind (no snapshot, no frozen filesystem).
 *   `freezeSeconds` is the time the volume's filesystem was frozen (0 if the
 *   mechanism needs no freeze).
 * - `createGroup` (optional) is `create` for several volumes at one instant,
 *   all or nothing: if one member fails, no member's snapshot is left.
 * - `remove` is idempotent: removing a missing snapshot succeeds. Afterwards
 *   the snapshot is gone from `list` and its path.
 * - `list` returns the snapshots this provider (or an earlier instance over
 *   the same state, e.g. before a kill) created and did not remove.
 * - `cleanupStale` removes every snapshot this provider created that is not
 *   in `keep` and thaws a filesystem left frozen by a killed process; it
 *   returns what it released, one entry per thing (a snapshot's entry names
 *   its id). It is called at agent start.
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
  /** The logical volume "VG/LV" of an LVM volume (lvm-classic, lvm-thin); default: from a /dev/VG/LV device path. */
  lv?: string;
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
  /**
   * The volume's size in bytes (what the agent announces). Optional: without
   * it the agent reads the size of `image` (a file) or `device` (a block device).
   */
  volumeSize?(volume: VolumeSpec): Promise<number>;
}
