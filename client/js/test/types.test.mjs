// The hand-written declarations (*.d.ts) against the modules they describe: every value each
// module exports is declared and nothing else is; every class's public methods, accessors and
// statics (and, for the classes in INSTANCES, the properties its constructor sets) are declared
// and nothing else is; the `Frame` union has exactly the frame types of FRAME_TYPES; ERROR_CODES
// is declared with exactly its names and numbers. "Public" means not starting with "_".
//
// How: the names found at run time are written into a TypeScript file that compares them with
// the declared types, and tsc checks it. A mismatch names the check and what is missing, e.g.
//   undeclared_RelayClient_members: error TS2322: Type '"none"' is not assignable to type '"acknowledgeStatuses"'.
// (declare it in client.d.ts: the comment at the top of each .d.ts says where things go), or
//   declared_but_not_in_module_frame_types: ... type '"status"'.
// A new class whose constructor sets public properties: add it to INSTANCES.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

const here = dirname(fileURLToPath(import.meta.url))
const packageDir = dirname(here)
const MODULES = ['index', 'client', 'codec', 'e2e', 'store']

/** Classes whose instances are built to find the properties their constructor sets: name -> its arguments. */
const INSTANCES = {
  RelayClient: () => [{ url: 'ws://127.0.0.1:1/relay', token: 't', WebSocketImpl: class {} }],
  RelayError: () => [0, 'x'],
  KeyChanged: () => [[{ mailbox: 'bob', pinned: '1', current: '2' }]],
  NoRecipientKey: () => [['bob']],
  InvalidKeyRecord: () => ['bob'],
  ProtocolError: () => [1001, 'x'],
  LocalProtocolError: () => [1001, 'x'],
  MessageStore: () => [null],
  FrameDecoder: () => [],
  E2EError: () => ['malformed']
}
/** Own properties every Error instance has, declared by Error itself. */
const ERROR_OWN = ['name', 'message', 'stack', 'cause']
const STATIC_OWN = new Set(['length', 'name', 'prototype'])

const isClass = (value) => typeof value === 'function' && /^class\b/.test(Function.prototype.toString.call(value))
const isPublic = (name) => !name.startsWith('_')
function union (names) {
  const list = [...names].sort()
  return list.length === 0 ? 'never' : list.map((n) => JSON.stringify(n)).join(' | ')
}

/** Lines asserting that the runtime names R and the declared names D (type expressions) are the same set. */
function sameNames (label, runtime, declared) {
  const R = union(runtime)
  return [
    `export const undeclared_${label}: [Exclude<${R}, ${declared}>] extends [never] ? 'none' : Exclude<${R}, ${declared}> = 'none'`,
    `export const declared_but_not_in_module_${label}: [Exclude<${declared}, ${R}>] extends [never] ? 'none' : Exclude<${declared}, ${R}> = 'none'`
  ]
}

/** Public names an instance has at run time: its prototype's methods and accessors, and (see INSTANCES) its own properties. */
function runtimeMembers (name, cls) {
  const members = new Set(Object.getOwnPropertyNames(cls.prototype).filter((n) => n !== 'constructor' && isPublic(n)))
  if (Object.hasOwn(INSTANCES, name)) {
    const instance = new cls(...INSTANCES[name]())
    for (const key of Object.getOwnPropertyNames(instance)) if (isPublic(key)) members.add(key)
  }
  return members
}

/**
 * A class's members and statics against its declaration. What its parent has is the parent's to
 * declare: a built-in parent's (Error, EventTarget) by the platform, one of this package's by its
 * own declaration, so only the names this class adds are compared.
 */
function classChecks (moduleName, name, cls, ours) {
  const declaredType = `InstanceType<typeof ${moduleName}.${name}>`
  const parent = Object.getPrototypeOf(cls)
  const members = runtimeMembers(name, cls)
  let parentKeys = null
  if (ours.has(parent)) {
    const parentName = ours.get(parent)
    for (const key of runtimeMembers(parentName, parent)) members.delete(key)
    parentKeys = `keyof InstanceType<typeof ${moduleName}.${parentName}>`
  } else if (parent !== Function.prototype) {
    if (parent === Error || Error.isPrototypeOf(parent)) for (const key of ERROR_OWN) members.delete(key)
    parentKeys = `keyof ${parent.name}`
  }
  const declared = parentKeys === null ? `keyof ${declaredType}` : `Exclude<keyof ${declaredType}, ${parentKeys}>`
  const statics = Object.getOwnPropertyNames(cls).filter((n) => !STATIC_OWN.has(n) && isPublic(n))
  return [
    ...sameNames(`${name}_members`, members, `(${declared}) & string`),
    ...sameNames(`${name}_statics`, statics, `Exclude<keyof typeof ${moduleName}.${name}, 'prototype'> & string`)
  ]
}

/** The TypeScript file that holds the module's run-time shape against its declarations. */
async function checkFile () {
  const lines = []
  const modules = {}
  const ours = new Map() // every exported class -> its name
  for (const moduleName of MODULES) {
    modules[moduleName] = await import(`../${moduleName}.js`)
    lines.push(`import * as ${moduleName} from ${JSON.stringify(join(packageDir, `${moduleName}.js`))}`)
    lines.push(...sameNames(`${moduleName}_exports`, Object.keys(modules[moduleName]), `keyof typeof ${moduleName}`))
    for (const [name, value] of Object.entries(modules[moduleName])) if (isClass(value)) ours.set(value, name)
  }
  const checked = new Set()
  for (const moduleName of MODULES) {
    for (const [name, value] of Object.entries(modules[moduleName])) {
      if (!isClass(value) || checked.has(value)) continue
      checked.add(value)
      lines.push(...classChecks(moduleName, name, value, ours))
    }
  }
  const codec = await import('../codec.js')
  lines.push(...sameNames('frame_types', codec.FRAME_TYPES, 'codec.FrameType'))
  lines.push(...sameNames('error_codes', Object.keys(codec.ERROR_CODES), 'keyof typeof codec.ERROR_CODES'))
  for (const [name, code] of Object.entries(codec.ERROR_CODES)) {
    // Exactly this number: the declared literal and the run-time value, both ways.
    lines.push(`export const code_${name}: typeof codec.ERROR_CODES.${name} = ${code}`)
    lines.push(`export const code_${name}_exact: ${code} = codec.ERROR_CODES.${name}`)
  }
  return lines.join('\n') + '\n'
}

const TSCONFIG = {
  compilerOptions: {
    target: 'es2022',
    module: 'nodenext',
    moduleResolution: 'nodenext',
    lib: ['es2022', 'dom'],
    types: [],
    strict: true,
    noEmit: true
  },
  files: ['check.mts']
}

/** tsc's errors, each with the name of the check it failed (e.g. `undeclared_RelayClient_members`). */
function explain (output, source) {
  const lines = source.split('\n')
  return output.split('\n').filter(Boolean).map((line) => {
    const at = /check\.mts\((\d+),\d+\): (.*)$/.exec(line)
    if (!at) return line
    const label = /^export const (\w+)/.exec(lines[Number(at[1]) - 1] ?? '')?.[1] ?? `line ${at[1]}`
    return `${label}: ${at[2]}`
  }).join('\n')
}

test('the declarations describe exactly what the modules export', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'relay-types-'))
  try {
    const source = await checkFile()
    await writeFile(join(dir, 'check.mts'), source)
    await writeFile(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG))
    const tsc = join(dirname(createRequire(import.meta.url).resolve('typescript/package.json')), 'bin', 'tsc')
    const result = await promisify(execFile)(process.execPath, [tsc, '-p', dir], { encoding: 'utf8' }).catch((err) => err)
    assert.equal(result.code ?? 0, 0, `client/js/*.d.ts do not match the modules:\n${explain(result.stdout + result.stderr, source)}`)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})
