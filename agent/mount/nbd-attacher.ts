/**
 * The NBD attach as its own small port: turn an export URI into a local
 * block device. Two implementations:
 * - nbdfuse-attacher.ts (the one this machine runs): nbdfuse exposes the
 *   export as a file in a FUSE mount, losetup makes that file a block device.
 * - nbd-client-attacher.ts: the kernel NBD client, when /dev/nbd0 exists.
 * Every step an attacher takes is recorded in the mount's journal before it
 * is taken (mount-steps.ts knows how to release each from the record alone).
 */
import { access } from 'node:fs/promises';
import type { MountJournal } from './mount-state.js';
import { KernelNbdAttacher } from './nbd-client-attacher.js';
import { NbdfuseAttacher } from './nbdfuse-attacher.js';

export interface AttachOptions {
  /** A directory of this mount's own (under the agent's state dir) for FUSE mounts, pid files and logs. */
  workDir: string;
  /** Distinguishes this export's files inside workDir (the volume name). */
  name: string;
  readOnly: boolean;
  /** nbds:// only: a directory with ca-cert.pem, the CA the appliance's certificate is checked against. */
  tlsCertificates?: string;
}

export interface NbdAttacher {
  readonly kind: 'nbdfuse' | 'nbd-client';
  /** Connects to `uri` and returns the block device (/dev/loopN, /dev/nbdN). */
  attach(uri: string, o: AttachOptions, journal: MountJournal): Promise<string>;
}

/** The kernel client when the kernel has NBD devices, else nbdfuse + loop. */
export async function defaultAttacher(): Promise<NbdAttacher> {
  const kernel = await access('/dev/nbd0').then(() => true, () => false);
  return kernel ? new KernelNbdAttacher() : new NbdfuseAttacher();
}
