import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, expectTypeOf, it } from 'vitest';
import type { blocksnap } from '../../proto/generated/blocksnap.js';
import type {
  Ack, Chunk, ChunkBatch, Committed, Decoded, EndVolume, EnvelopeKind, Hello, JobMode, JobResult, MessageMap,
  RunJob, TransferStats, VolumeInfo, WalPiece,
} from '../../proto/messages.js';

/**
 * Type-level pins of the message types proto/messages.ts derives from the
 * generated raw interfaces (proto/generated/blocksnap.d.ts). The
 * `expectTypeOf` lines are checked by the compiler, not at run time: `npm test`
 * type-checks first, and the last test here compiles this file with tsc so a
 * plain `vitest run test/proto` enforces them too.
 */

type Raw = blocksnap.v1.Envelope.$Properties;
type RawOf<K extends EnvelopeKind> = NonNullable<Raw[K]>;
type Fields<P> = Exclude<keyof P, '$unknowns'>;
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true : false;
type Elem<V> = V extends readonly (infer E)[] ? NonNullable<E> : V;
type IsMessage<V> = [V] extends [Uint8Array] ? false : [V] extends [number | string | boolean] ? false : [V] extends [object] ? true : false;
/** `true` when T names exactly P's schema fields, recursively through nested (and repeated) messages. */
type SameFields<T, P> = Equal<keyof T, Fields<P>> extends false ? false : {
  [K in Fields<P> & keyof T]-?: IsMessage<Elem<NonNullable<P[K]>>> extends true
    ? SameFields<Elem<NonNullable<T[K]>>, Elem<NonNullable<P[K]>>>
    : true;
}[Fields<P> & keyof T];
type OptionalKeys<T> = { [K in keyof T]-?: object extends Pick<T, K> ? K : never }[keyof T];

describe('message types derived from the schema', () => {
  it('every envelope kind is a oneof member of the generated Envelope', () => {
    expectTypeOf<EnvelopeKind>().toEqualTypeOf<NonNullable<Raw['msg']>>();
    expectTypeOf<keyof MessageMap>().toEqualTypeOf<NonNullable<Raw['msg']>>();
  });

  it('every message names exactly the fields of its generated interface, nested messages included', () => {
    expectTypeOf<{ [K in EnvelopeKind]: SameFields<MessageMap[K], RawOf<K>> }>()
      .toEqualTypeOf<{ [K in EnvelopeKind]: true }>();
  });

  it('maps wire types to the decoded shape: 64-bit → number, bytes → Uint8Array, enum → JobMode, repeated → array', () => {
    expectTypeOf<Ack['durableNext']>().toEqualTypeOf<number>();
    expectTypeOf<Chunk['index']>().toEqualTypeOf<number>();
    expectTypeOf<Chunk['data']>().toEqualTypeOf<Uint8Array>();
    expectTypeOf<WalPiece['digest']>().toEqualTypeOf<Uint8Array>();
    expectTypeOf<RunJob['mode']>().toEqualTypeOf<JobMode>();
    expectTypeOf<ChunkBatch['chunks']>().toEqualTypeOf<Chunk[]>();
    expectTypeOf<Hello['volumes']>().toEqualTypeOf<VolumeInfo[]>();
    expectTypeOf<TransferStats['audited']>().toEqualTypeOf<boolean>();
    expectTypeOf<TransferStats['readSeconds']>().toEqualTypeOf<number>();
  });

  it('every field is required except message fields and the ones optional by design', () => {
    expectTypeOf<OptionalKeys<Hello>>().toEqualTypeOf<'groups'>();
    expectTypeOf<OptionalKeys<Committed>>().toEqualTypeOf<'stats' | 'setId' | 'images'>();
    expectTypeOf<OptionalKeys<EndVolume>>().toEqualTypeOf<'stats'>();
    expectTypeOf<OptionalKeys<JobResult>>().toEqualTypeOf<'stats'>();
    expectTypeOf<EndVolume['stats']>().toEqualTypeOf<TransferStats | undefined>();
    expectTypeOf<OptionalKeys<MessageMap['runMount']>>().toEqualTypeOf<'verify'>();
    expectTypeOf<OptionalKeys<MessageMap['mountResult']>>().toEqualTypeOf<'check'>();
    type Others = Exclude<EnvelopeKind, 'hello' | 'committed' | 'endVolume' | 'jobResult' | 'runMount' | 'mountResult'>;
    expectTypeOf<{ [K in Others]: OptionalKeys<MessageMap[K]> }>().toEqualTypeOf<{ [K in Others]: never }>();
  });

  it('a field added to a raw interface appears in the decoded type with no hand edit', () => {
    // What pbts writes for a new message: optional, nullable fields; Long for 64-bit.
    interface NewRaw {
      count?: blocksnap.v1.Ping.$Properties['nonce'];
      name?: string | null;
      blob?: Uint8Array | null;
      sub?: blocksnap.v1.Ack.$Properties | null;
      items?: blocksnap.v1.Chunk.$Properties[] | null;
      $unknowns?: Uint8Array[];
    }
    type D = Decoded<NewRaw>;
    expectTypeOf<keyof D>().toEqualTypeOf<'count' | 'name' | 'blob' | 'sub' | 'items'>();
    expectTypeOf<D['count']>().toEqualTypeOf<number>();
    expectTypeOf<D['name']>().toEqualTypeOf<string>();
    expectTypeOf<D['blob']>().toEqualTypeOf<Uint8Array>();
    expectTypeOf<D['sub']>().toEqualTypeOf<Ack | undefined>();
    expectTypeOf<D['items']>().toEqualTypeOf<Chunk[]>();
    expectTypeOf<OptionalKeys<D>>().toEqualTypeOf<'sub'>();
    expectTypeOf<OptionalKeys<Decoded<NewRaw, 'name'>>>().toEqualTypeOf<'sub' | 'name'>();
  });

  // Compiles this file on its own (and a copy with one wrong pin, which must
  // fail), so the pins above bite under `vitest run` as well as under `npm test`.
  it('the pins above type-check, and a wrong pin does not', async () => {
    const root = resolve(fileURLToPath(new URL('../..', import.meta.url)));
    const self = fileURLToPath(import.meta.url);
    const tsc = (file: string) =>
      promisify(execFile)(join(root, 'node_modules/.bin/tsc'), [
        '--ignoreConfig', '--noEmit', '--strict', '--target', 'ES2022', '--module', 'NodeNext', '--moduleResolution', 'NodeNext',
        '--skipLibCheck', '--types', 'node', file,
      ], { cwd: root });
    await expect(tsc(self)).resolves.toBeDefined();

    // Outside the project's globs (other tsc/vitest runs must not see it), yet
    // where 'vitest' resolves: under node_modules/.cache.
    mkdirSync(join(root, 'node_modules/.cache'), { recursive: true });
    const dir = mkdtempSync(join(root, 'node_modules/.cache/blocksnap-message-types-'));
    try {
      const wrong = join(dir, 'wrong.ts');
      writeFileSync(wrong, [
        `import { expectTypeOf } from 'vitest';`,
        `import type { Ack } from ${JSON.stringify(join(root, 'proto/messages.js'))};`,
        `expectTypeOf<keyof Ack>().toEqualTypeOf<'jobId' | 'seq'>();`,
      ].join('\n'));
      await expect(tsc(wrong)).rejects.toMatchObject({ stdout: expect.stringContaining('wrong.ts') });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);
});
