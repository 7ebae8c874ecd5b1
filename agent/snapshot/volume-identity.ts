/**
 * The proof that a configured volume's `device`, backing store (`image`) and
 * `mountpoint` are one volume (DESIGN.md §7.3). Nothing else in the agent
 * checks that: the snapshot provider clones the configured backing store,
 * the tracker watches the configured device and PostgreSQL is located under
 * the configured mount, so a configuration naming parts of two volumes backs
 * up the wrong bytes, or misses writes, without any error.
 *
 * The port is deliberately narrow, one call per volume, so each provider
 * proves it with its own means: the reflink provider with the loop device's
 * backing inode (loop-volume-identity.ts), an LVM provider with LV ↔ dm
 * device ↔ mount. It is called at agent start and before every job.
 */
import { BlocksnapError } from '../../proto/errors.js';
import type { DeviceIdentity } from '../cbt/tracker.js';
import type { VolumeSpec } from './snapshot-provider.js';

/** What was proven to belong together. */
export interface VolumeIdentity {
  volume: string;
  /** The block device the filesystem is on: the device the tracker must trace. */
  device: DeviceIdentity & { path: string };
  /**
   * What the provider snapshots. For a file-backed volume: the image file,
   * identified by its filesystem's device (`dev`, major:minor) and inode.
   */
  backing: { kind: string; path: string; dev: string; ino: string; size: number };
  /** The filesystem mounted at the mountpoint (its device is `device`). */
  mount: { path: string; dev: string; fstype: string };
}

/** The field a mismatch is about. */
export type IdentityField = 'device' | 'image' | 'mountpoint' | 'size' | 'tracker';

export interface IdentityMismatch {
  field: IdentityField;
  /** What the configuration says (a path, a size). */
  configured: string;
  /** What the system says instead. */
  found: string;
}

/**
 * Proves one configured volume. Resolves with the proven identity, or
 * rejects with a VolumeIdentityError (code E_IDENTITY) naming every
 * mismatch. Holds nothing and changes nothing.
 */
export interface VolumeIdentityCheck {
  proveIdentity(volume: VolumeSpec): Promise<VolumeIdentity>;
}

/** E_IDENTITY: the configuration of `volume` does not describe one volume. */
export class VolumeIdentityError extends BlocksnapError {
  constructor(readonly volume: string, readonly mismatches: IdentityMismatch[], options?: { cause?: unknown }) {
    super('E_IDENTITY', identityMessage(volume, mismatches), options);
  }
}

function identityMessage(volume: string, mismatches: IdentityMismatch[]): string {
  const what = mismatches.map((m) => `${m.field}: configured ${m.configured}, found ${m.found}`).join('; ');
  return `volume ${volume} is not one volume: ${what}`;
}

export function devString(major: number, minor: number): string {
  return `${major}:${minor}`;
}

/** Proves every volume; the first refused volume rejects (its error names it). */
export async function proveVolumes(check: VolumeIdentityCheck, volumes: readonly VolumeSpec[]): Promise<Map<string, VolumeIdentity>> {
  const out = new Map<string, VolumeIdentity>();
  for (const v of volumes) out.set(v.name, await check.proveIdentity(v));
  return out;
}

/** What a tracker's start says about its device (Tracker.startInfo.identity) and how to invalidate it. */
export interface TrackerBinding {
  readonly startInfo: { identity: DeviceIdentity };
  invalidate(reason: string): void;
}

/**
 * The tracker of a volume must trace the proven device. Another device
 * number means its bitmap describes another disk: refused (E_IDENTITY), a
 * job must not run on it. The same number with another attach (diskseq) or
 * size means the device was re-attached or resized since tracking began:
 * the bitmap cannot vouch for the writes in between, so the tracker is made
 * invalid (the job falls back to comparing digests) instead.
 */
export function checkTrackerBinding(identity: VolumeIdentity, tracker: TrackerBinding): void {
  const t = tracker.startInfo.identity;
  const d = identity.device;
  if (t.major !== d.major || t.minor !== d.minor) {
    throw new VolumeIdentityError(identity.volume, [{
      field: 'tracker',
      configured: `${d.path} (${devString(d.major, d.minor)})`,
      found: `the change tracker traces ${devString(t.major, t.minor)}`,
    }]);
  }
  if (t.diskseq !== d.diskseq) {
    tracker.invalidate(`${d.path} was re-attached since tracking started (diskseq ${t.diskseq} -> ${d.diskseq})`);
  } else if (t.size !== d.size) {
    tracker.invalidate(`${d.path} changed size since tracking started (${t.size} -> ${d.size} bytes)`);
  }
}
