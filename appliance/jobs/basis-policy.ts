import type { ImageRow } from '../catalog/catalog.js';

/**
 * The incremental basis check (DESIGN.md §1, "Basis"): an incremental may
 * build only on the volume's last committed image, of the same geometry
 * (Proxmox Backup Server refuses the same way). Anything else is sent as a
 * full, with the reason the agent reports.
 */
export interface BasisDecision {
  mode: 'full' | 'incremental';
  /** The accepted basis, when mode is incremental. */
  basis: ImageRow | null;
  /** Why an incremental was refused ('' when accepted or a full was asked for). */
  reason: string;
}

export function decideBasis(
  asked: { incremental: boolean; basisImageId: string; volumeSize: number; chunkSize: number },
  last: ImageRow | undefined,
): BasisDecision {
  if (!asked.incremental) return { mode: 'full', basis: null, reason: '' };
  let reason = '';
  if (!last) reason = 'the volume has no image yet';
  else if (asked.basisImageId !== last.id) reason = `basis ${asked.basisImageId || '(none)'} is not the last image ${last.id}`;
  else if (last.volumeSize !== asked.volumeSize || last.chunkSize !== asked.chunkSize) reason = 'volume size or chunk size changed';
  return reason ? { mode: 'full', basis: null, reason } : { mode: 'incremental', basis: last!, reason: '' };
}
