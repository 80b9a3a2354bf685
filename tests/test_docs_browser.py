"""`/docs` in a real browser: Debian's chromium, headless, driven by Selenium through Debian's
chromedriver, against a real gunicorn behind nginx with the production template.

The page lists every operation of `/openapi.json`; a call without a token is a 401; the token
set through the page's Authorize dialog makes the same "Try it out" call a 200, whose write is
in the database. Every file the page loads comes from the service: the browser can resolve no
other host.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from scripts.topology import Nginx, find_nginx
from tests.service import TOKEN, Service, running_service
from tests.tools import require_tool

WAIT_SECONDS = 30
# Debian's packages (scripts/ensure_tools.sh installs them). The driver's path is given, so
# Selenium Manager never runs and nothing is downloaded.
CHROMIUM = ('/usr/bin/chromium', 'chromium')
CHROMEDRIVER = ('/usr/bin/chromedriver', 'chromedriver')
CHROMIUM_FLAGS = (
    '--headless=new',
    '--no-sandbox',  # CI runs as root
    '--disable-dev-shm-usage',
    '--window-size=1400,1000',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    # Every host but the service's is unknown: a page that needed a CDN would not load.
    '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
)


def system_binary(path: str, name: str) -> str:
    return require_tool(path if Path(path).is_file() else shutil.which(name), name)


@pytest.fixture(scope='module')
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = system_binary(*CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(executable_path=system_binary(*CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope='module')
def service(database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(database, str(tmp_path_factory.mktemp('docs-logs'))) as running:
        yield running


@pytest.fixture(scope='module')
def nginx(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    require_tool(find_nginx(), 'nginx')
    proxy = Nginx(tmp_path_factory.mktemp('docs-nginx'), [service.port])
    proxy.start()
    yield proxy
    proxy.stop()


def wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, WAIT_SECONDS)


def visible(driver: WebDriver, selector: str, within: WebElement | None = None) -> WebElement:
    """The first element matching `selector` (inside `within`) once one is displayed."""
    scope = within or driver

    def shown(_: WebDriver) -> WebElement | bool:
        found = [element for element in scope.find_elements(By.CSS_SELECTOR, selector) if element.is_displayed()]
        return found[0] if found else False

    element: WebElement = wait(driver).until(shown)
    return element


def click(driver: WebDriver, element: WebElement) -> None:
    driver.execute_script('arguments[0].scrollIntoView({block: "center"})', element)
    wait(driver).until(expected_conditions.element_to_be_clickable(element))
    element.click()


def execute_and_read_status(driver: WebDriver, operation: WebElement) -> int:
    """Press Execute and return the status the page shows for the answer."""
    click(driver, operation.find_element(By.CSS_SELECTOR, 'button.execute'))
    cell = '.live-responses-table .response .response-col_status'
    wait(driver).until(lambda _: operation.find_elements(By.CSS_SELECTOR, cell))
    status = operation.find_element(By.CSS_SELECTOR, cell).text.split()[0]
    click(driver, operation.find_element(By.CSS_SELECTOR, 'button.btn-clear'))
    return int(status)


def authorize(driver: WebDriver, token: str) -> None:
    """Set the token through the page's Authorize dialog, as a developer does."""
    click(driver, driver.find_element(By.CSS_SELECTOR, '.scheme-container .btn.authorize'))
    visible(driver, '#auth-bearer-value').send_keys(token)
    click(driver, driver.find_element(By.CSS_SELECTOR, '.auth-btn-wrapper button.authorize'))
    visible(driver, '.auth-btn-wrapper button[aria-label="Remove authorization"]')  # it holds a token now
    click(driver, driver.find_element(By.CSS_SELECTOR, '.auth-btn-wrapper button.btn-done'))


def test_the_docs_page_lists_every_operation_and_calls_an_action_with_the_token(
    browser: WebDriver, nginx: Nginx, db: psycopg2.extensions.connection
) -> None:
    answer = requests.get(f'{nginx.url}/openapi.json', timeout=10)  # nginx passes the contract through
    assert answer.status_code == 200 and answer.headers['Content-Type'] == 'application/json', answer.text[:300]
    document = answer.json()
    expected = {(path, method.upper()) for path, item in document['paths'].items() for method in item}
    assert ('/example/bar', 'POST') in expected and ('/probe/add_item', 'POST') in expected

    browser.get(f'{nginx.url}/docs')  # through nginx, as a developer reaches it
    visible(browser, '.opblock')
    blocks = {
        (
            block.find_element(By.CSS_SELECTOR, '.opblock-summary-path').get_attribute('data-path'),
            block.find_element(By.CSS_SELECTOR, '.opblock-summary-method').text,
        ): block
        for block in browser.find_elements(By.CSS_SELECTOR, '.opblock')
    }
    assert set(blocks) == expected

    bar = blocks['/example/bar', 'POST']
    click(browser, bar.find_element(By.CSS_SELECTOR, '.opblock-summary-control'))
    click(browser, visible(browser, '.try-out__btn', within=bar))
    body = visible(browser, 'textarea.body-param__text', within=bar)
    name = f'docs-{uuid.uuid4().hex[:8]}'
    body.send_keys(Keys.CONTROL, 'a')  # the page's own editor: replace its example body as a person would
    body.send_keys(Keys.DELETE)
    body.send_keys(f'{{"name": "{name}", "email": "{name}@example.com"}}')

    assert execute_and_read_status(browser, bar) == 401  # no token yet
    authorize(browser, TOKEN)
    assert execute_and_read_status(browser, bar) == 200
    with db.cursor() as cursor:
        cursor.execute('SELECT email FROM users WHERE name = %s', [name])
        assert cursor.fetchall() == [(f'{name}@example.com',)]

    loaded = browser.execute_script('return performance.getEntriesByType("resource").map(e => e.name)')
    assert loaded and all(url.startswith(f'{nginx.url}/') for url in loaded), loaded
