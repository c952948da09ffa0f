"""CONTRIBUTING.rst's layout table stays true: every module of tgext.evolve is in it, and imports
only the modules of tgext.evolve listed for it (at the top or inside a function alike)."""
import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'tgext' / 'evolve'
CONTRIBUTING = PACKAGE.parent.parent / 'CONTRIBUTING.rst'


def layout_rows():
    """``{module key: text of its "may import" column}`` from the Layout table."""
    lines = CONTRIBUTING.read_text().splitlines()
    start = lines.index('Layout')
    rules = [i for i in range(start, len(lines)) if re.fullmatch(r'=+(  =+)+', lines[i])]
    columns = [m.start() for m in re.finditer(r'=+', lines[rules[0]])]
    rows, current = {}, None
    for line in lines[rules[1] + 1:rules[2]]:
        name, allowed = line[:columns[1]].strip(), line[columns[2]:].strip()
        if name:
            current = name.strip('`').removesuffix('.py').removesuffix('/').replace('/', '.')
            if current != '__init__':
                current = current.removesuffix('.__init__')
            rows[current] = ''
        rows[current] += ' ' + allowed
    return rows


def allowed_modules(key, text, modules):
    """The module keys ``text`` names, resolved as seen from module ``key``."""
    package = key.rpartition('.')[0]
    if text.strip() == 'nothing':
        return set()
    allowed = set()
    for name in re.findall(r'``([\w.]+)``', text):
        local = f'{package}.{name}' if package else name
        allowed.add(local if local in modules else name)
    if 'the ``sql_*``' in text:
        allowed |= {m for m in modules if m.startswith('backends.sql_')}
    if 'its backends' in text:
        allowed |= {'backends.sqlalchemy', 'backends.ming'}
    return allowed


def module_key(path):
    relative = path.relative_to(PACKAGE).with_suffix('')
    parts = list(relative.parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts) or '__init__'


def imported_modules(path, modules):
    """Keys of the tgext.evolve modules ``path`` imports, wherever the import statement is."""
    key = module_key(path)
    package = key if path.name == '__init__.py' else key.rpartition('.')[0]
    if key == '__init__':
        package = ''
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.') if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = '.'.join(base + ([node.module] if node.module else []))
            elif (node.module or '').startswith('tgext.evolve'):
                target = node.module[len('tgext.evolve'):].lstrip('.')
            else:
                continue
            names = [f'{target}.{a.name}' if target else a.name for a in node.names]
            for name in names:
                found.add(name if name in modules else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('tgext.evolve.'):
                    found.add(alias.name[len('tgext.evolve.'):])
    return {m for m in found if m and m != key and m in modules}


def test_every_module_is_in_the_layout_and_imports_only_what_it_lists():
    paths = sorted(PACKAGE.rglob('*.py'))
    modules = {module_key(p) for p in paths}
    rows = layout_rows()
    # A package's row (status_page/) covers its modules, which may import one another.
    packages = {key for key in rows if any(m.startswith(key + '.') for m in modules)}
    problems = []
    for path in paths:
        key = module_key(path)
        row = key if key in rows else next((p for p in packages if key.startswith(p + '.')),
                                           None)
        if row is None:
            problems.append(f'{key}: not in CONTRIBUTING.rst\'s layout')
            continue
        allowed = allowed_modules(row, rows[row], modules)
        inside = {m for m in modules if row in packages and (m == row or m.startswith(row + '.'))}
        extra = {m for m in imported_modules(path, modules) if m not in allowed | inside
                 and not any(m.startswith(a + '.') for a in allowed)}
        if extra:
            problems.append(f'{key} imports {", ".join(sorted(extra))}: not listed for it')
    assert not problems, '\n'.join(problems)


def test_no_module_imports_one_that_imports_it_back():
    """What the table promises: no import cycle, even through imports inside functions."""
    import graphlib
    paths = sorted(PACKAGE.rglob('*.py'))
    modules = {module_key(p) for p in paths}
    graph = {module_key(p): imported_modules(p, modules) for p in paths}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f'import cycle: {" -> ".join(e.args[1])}') from None
