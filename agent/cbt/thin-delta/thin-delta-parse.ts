/**
 * Parses `thin_delta` output (thin-provisioning-tools 0.9, XML, without
 * --verbose): ranges of pool blocks that are `same`, `different`,
 * `left_only` (mapped in the basis only: discarded since) or `right_only`
 * (newly provisioned). Every range but `same` is a change. The data block
 * size (in 512-byte sectors) comes from the `<superblock>` element.
 */
import { BlocksnapError } from '../../../proto/errors.js';

export interface ThinDelta {
  /** Pool block size in bytes. */
  blockBytes: number;
  /** Changed ranges in pool blocks: [begin, length]. */
  changed: Array<[number, number]>;
}

const ATTR = (tag: string, name: string): number | null => {
  const m = new RegExp(`\\b${name}="(\\d+)"`).exec(tag);
  return m ? Number(m[1]) : null;
};

export function parseThinDelta(xml: string): ThinDelta {
  const sb = /<superblock\b[^>]*>/.exec(xml);
  const blockSectors = sb ? ATTR(sb[0], 'data_block_size') : null;
  if (!sb || !blockSectors) throw new BlocksnapError('E_TRACKER', `thin_delta printed no superblock with a data_block_size: ${xml.slice(0, 200)}`);
  if (!/<diff\b/.test(xml)) throw new BlocksnapError('E_TRACKER', `thin_delta printed no <diff>: ${xml.slice(0, 200)}`);
  const changed: Array<[number, number]> = [];
  for (const m of xml.matchAll(/<(same|different|left_only|right_only)\b[^>]*\/?>/g)) {
    if (m[1] === 'same') continue;
    const begin = ATTR(m[0], 'begin');
    const length = ATTR(m[0], 'length');
    if (begin === null || length === null) throw new BlocksnapError('E_TRACKER', `unparseable thin_delta range ${m[0]}`);
    changed.push([begin, length]);
  }
  return { blockBytes: blockSectors * 512, changed };
}
