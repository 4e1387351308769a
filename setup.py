"""Packaging for unifiededit. All metadata lives in settings.ini (nbdev 2 convention).

Differences from the nbdev 2 template: no `pkg_resources` (removed from recent setuptools), Python 3.11-3.13 listed,
and the licence given as an SPDX expression instead of the deprecated licence classifier.
"""
import shlex
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

cfg_keys = 'version description keywords author author_email'.split()
expected = cfg_keys + "lib_name user branch license status min_python audience language".split()
for o in expected: assert o in cfg, f"missing expected setting: {o}"
setup_cfg = {o: cfg[o] for o in cfg_keys}

spdx = {'apache2': 'Apache-2.0', 'mit': 'MIT', 'gpl3': 'GPL-3.0-only', 'bsd3': 'BSD-3-Clause'}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

requirements = shlex.split(cfg.get('requirements', ''))
if cfg.get('pip_requirements'): requirements += shlex.split(cfg.get('pip_requirements', ''))
min_python = cfg['min_python']
test_requirements = shlex.split(cfg.get('test_requirements') or '')
dev_requirements = shlex.split(cfg.get('dev_requirements') or '')
demo_requirements = shlex.split(cfg.get('demo_requirements') or '')
docs_requirements = shlex.split(cfg.get('docs_requirements') or '')

setuptools.setup(
    name=cfg['lib_name'],
    license=spdx.get(cfg['license'].lower(), cfg['license']),
    classifiers=[
        'Development Status :: ' + statuses[int(cfg['status'])],
        'Intended Audience :: ' + cfg['audience'],
        'Natural Language :: ' + cfg['language'].title(),
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ] + ['Programming Language :: Python :: ' + o for o in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path'] + '.*']),
    include_package_data=True,
    package_data={cfg['lib_path']: ['samples/*']},       # the bundled data files (unifiededit/samples/SOURCES.md)
    install_requires=requirements,
    extras_require={'dev': dev_requirements + test_requirements + demo_requirements + docs_requirements,
                    'test': test_requirements + demo_requirements, 'demo': demo_requirements, 'docs': docs_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={
        'console_scripts': cfg.get('console_scripts', '').split(),
        'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
    **setup_cfg)
